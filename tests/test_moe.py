"""The moe morph on exported Hugging Face transformers (tests/hf_support.py), checked against the eager model.

Each child is compared on fresh inputs with the Hugging Face model's own logits (not only with the
parent, as the morph's verification does), and shown to route: different tokens pick different
experts, and changing one expert changes the output. TorchScript exports of GPT-2, Llama, Qwen2,
OPT and Phi-3 (fused gate-up) and the dynamo export of Llama run by default; the rest of the zoo and
the other exporter are marked slow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hf_support import ALL_KINDS, EXPORT_FAILURES, facts, hf_export  # noqa: F401  (fixture)

import onnxmorph
from onnxmorph.analysis import experts as mexperts
from onnxmorph.graph import core as mgraph

DEFAULT = ("gpt2", "llama", "qwen2", "opt", "phi3")
MOE_KINDS = ("mixtral", "qwen2_moe")
# families whose FFN is an FFN (a down projection over units made from projections of one tensor); swin's blocks
# and the encoders' too
DENSE = tuple(k for k in ALL_KINDS if k not in MOE_KINDS)


def _session(model: onnx.ModelProto, extra: tuple[str, ...] = ()) -> ort.InferenceSession:
    if extra:
        model = _with_outputs(model, extra)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def _first_ffn(model: onnx.ModelProto) -> mexperts.FFN:
    found = mexperts.model_ffns(mgraph.Analysis(model))
    assert found, "an FFN is found"
    return found[0]


def _check(hf, child: onnx.ModelProto, seed: int = 7) -> dict[str, np.ndarray]:
    feed = hf.feed(seed=seed, batch=3, sequence=9)
    got = _session(child).run(None, feed)[0]
    np.testing.assert_allclose(got, hf.logits(feed), atol=1e-4, rtol=1e-4)
    return feed


def _routes(child: onnx.ModelProto, feed: dict[str, np.ndarray]) -> set[tuple[int, ...]]:
    """The sets of experts the first router picks, over all tokens of `feed`."""
    topk = next(n for n in child.graph.node if n.op_type == "TopK" and "morph_moe" in n.name)
    chosen = _session(child, (topk.output[1],)).run([topk.output[1]], feed)[0]
    return {tuple(sorted(row)) for row in chosen.reshape(-1, chosen.shape[-1]).tolist()}


def _upcycle(hf, **params) -> onnx.ModelProto:
    parent = onnxmorph.load(hf.path)
    ffn = _first_ffn(parent)
    child, report = onnxmorph.morph(parent, "moe", layer=ffn.name, **params)
    assert report, report.summary()  # the default tolerances
    return child


def _upcycle_checked(hf, experts: int = 4, top_k: int = 2) -> None:
    child = _upcycle(hf, experts=experts, top_k=top_k)
    feed = _check(hf, child)
    routes = _routes(child, feed)
    assert len(routes) > 1 and all(len(r) == top_k for r in routes), routes
    moe = next(m for m in onnxmorph.inspect(child)["experts"]["moes"] if m["form"] == "dense")
    assert (moe["experts"], moe["top_k"]) == (experts, top_k) and len(moe["experts_list"]) == experts
    # every expert counts: other down weights in the last copy change the output (random ones, not zeros: a norm
    # after the FFN, as in Gemma 2, would not see the copy's output merely scaled)
    broken = onnx.ModelProto()
    broken.CopyFrom(child)
    down = moe["experts_list"][-1]["down"]
    weight = next(n.input[1] for n in broken.graph.node if n.name == down)
    init = next(t for t in broken.graph.initializer if t.name == weight)
    old = onnx.numpy_helper.to_array(init)
    new = np.random.default_rng(0).normal(0, old.std(), old.shape).astype(old.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(new, weight))
    assert np.abs(_session(broken).run(None, feed)[0] - _session(child).run(None, feed)[0]).max() > 1e-4


@pytest.mark.parametrize("kind", DEFAULT)
def test_upcycled_ffn_equals_the_hf_model_and_routes(hf_export, kind) -> None:  # noqa: F811
    _upcycle_checked(hf_export(kind, False))


def test_upcycled_dynamo_export_equals_the_hf_model(hf_export) -> None:  # noqa: F811
    _upcycle_checked(hf_export("llama", True), experts=8, top_k=2)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dynamo"), [(kind, dynamo) for kind in DENSE for dynamo in (False, True)
                                              if (kind, None, dynamo) not in EXPORT_FAILURES])  # exporter faults
def test_upcycling_every_dense_family(hf_export, kind, dynamo) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    _upcycle_checked(hf)
    child = _upcycle(hf, experts=4, top_k=1, shards=2, shared_expert="copy", routing="softmax-topk")
    _check(hf, child)


@pytest.mark.parametrize("kind,params", [
    ("llama", {"experts": 8, "top_k": 2, "shards": 2, "noise": 0.3, "shared_expert": "copy"}),
    ("llama", {"experts": 4, "top_k": 4, "shards": 4}),
    ("phi3", {"experts": 4, "top_k": 1, "shards": 2, "noise": 0.3, "routing": "softmax-topk"}),  # fused gate-up
    ("gpt2", {"experts": 6, "top_k": 1, "shards": 2, "shared_expert": "random", "routing": "softmax-topk"}),
    ("opt", {"experts": 4, "top_k": 2, "noise": 0.3}),  # relu: the up rows rescale
    ("qwen2", {"experts": 4, "top_k": 2, "routing": "softmax-topk"}),
])
def test_shards_noise_shared_expert_and_routings_stay_exact(hf_export, kind, params) -> None:  # noqa: F811
    hf = hf_export(kind, False)
    child = _upcycle(hf, **params)
    _check(hf, child)
    moe = next(m for m in onnxmorph.inspect(child)["experts"]["moes"] if m["form"] == "dense")
    shards = params.get("shards", 1)
    assert moe["experts"] == params["experts"] and moe["groups"] == (shards if params["experts"] > shards else 1)
    assert {e["hidden"] for e in moe["experts_list"]} == {_first_ffn(onnxmorph.load(hf.path)).hidden // shards}
    assert len(moe.get("shared", [])) == (params.get("shared_expert", "none") != "none")


def test_noise_makes_the_copies_other_parameters_of_one_function(hf_export) -> None:  # noqa: F811
    hf = hf_export("llama", False)
    child = _upcycle(hf, experts=3, top_k=2, noise=0.3)
    _check(hf, child)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in child.graph.initializer}
    ups = [weights[n.input[1]] for n in child.graph.node if n.op_type == "MatMul" and n.name.endswith("up_proj/MatMul")
           and ("morph_moe" in n.name or "layers.0" in n.name)]
    assert len(ups) == 3
    assert not np.allclose(ups[0], ups[1]) and not np.allclose(ups[1], ups[2])
    ratio = ups[1] / ups[0]  # a positive factor per hidden unit (column), the same down the column
    assert (ratio > 0).all() and np.allclose(ratio, ratio[:1], rtol=1e-5)


@pytest.mark.parametrize("kind,params,message", [
    ("gpt2", {"experts": 4, "top_k": 2, "noise": 0.1}, "not gated and its activation"),
    ("llama", {"experts": 4, "top_k": 2, "shards": 4}, "exact only with --top-k 4"),
    ("llama", {"experts": 4, "top_k": 2, "routing": "softmax-topk", "router": "random"}, "must start at zero"),
    ("llama", {"experts": 6, "top_k": 2, "shards": 4}, "multiple of shards"),
    ("llama", {"experts": 4, "top_k": 1}, "never gets a gradient"),
])
def test_inexact_requests_are_refused_in_one_line(hf_export, kind, params, message) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export(kind, False).path)
    with pytest.raises(onnxmorph.NotApplicable, match=message) as info:
        onnxmorph.moe(parent, layer=_first_ffn(parent).name, **params)
    assert "\n" not in str(info.value)


def test_a_layer_outside_any_ffn_is_refused_naming_it(hf_export) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("llama", False).path)
    query = onnxmorph.inspect(parent)["attention"][0]["query"]
    with pytest.raises(onnxmorph.NotApplicable, match="is not in an FFN"):
        onnxmorph.moe(parent, layer=query, experts=4, top_k=2)
    with pytest.raises(onnxmorph.UsageError, match="no FFN 'nope'"):
        onnxmorph.moe(parent, layer="nope", experts=4, top_k=2)


def test_an_opset_without_scatter_elements_is_refused() -> None:
    rng = np.random.default_rng(0)
    from conftest import text_model

    model = text_model("h = MatMul(x, up)\n a = Relu(h)\n y = MatMul(a, down)",
                       {"up": rng.normal(size=(4, 8)), "down": rng.normal(size=(8, 4))},
                       x="float[2, 4]", y="float[2, 4]", opset=10)
    with pytest.raises(onnxmorph.NotApplicable, match="opset 11"):
        onnxmorph.moe(model, layer="y", experts=2, top_k=2)


def test_a_hand_built_relu_ffn_upcycles_with_rescaled_copies() -> None:
    rng = np.random.default_rng(1)
    from conftest import text_model

    model = text_model("h = MatMul(x, up)\n hb = Add(h, b1)\n a = Relu(hb)\n z = MatMul(a, down)\n y = Add(z, b2)",
                       {"up": rng.normal(size=(4, 8)), "b1": rng.normal(size=8), "down": rng.normal(size=(8, 4)),
                        "b2": rng.normal(size=4)}, x="float[3, 4]", y="float[3, 4]", opset=13)
    child, report = onnxmorph.morph(model, "moe", layer="z", experts=4, top_k=1, shards=2, noise=0.5,
                                    routing="softmax-topk")
    assert report, report.summary()
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(_session(child).run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- growing an MoE


def _grow(hf, experts: int, top_k: int, **params) -> onnx.ModelProto:
    parent = onnxmorph.load(hf.path)
    child, report = onnxmorph.morph(parent, "moe", layer="0", experts=experts, top_k=top_k, **params)
    assert report, report.summary()
    return child


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_an_moe_grows_to_m_times_the_experts_with_m_times_k(hf_export, kind) -> None:  # noqa: F811
    hf = hf_export(kind, False)
    child = _grow(hf, 12, 6, noise=0.3)
    _check(hf, child)
    grown = onnxmorph.inspect(child)["experts"]["moes"][0]
    assert (grown["experts"], grown["top_k"], grown["form"]) == (12, 6, "stacked")
    stacked = {w["name"]: w["shape"] for w in grown["expert_weights"]}
    assert all(shape[0] == 12 for shape in stacked.values())
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in child.graph.initializer}
    up = weights[next(n for n in stacked if "gate_up" in n)]
    assert not np.allclose(up[4:8], up[0:4])  # the copies' up rows are rescaled: they can separate
    assert np.allclose(up[0:4], onnx.numpy_helper.to_array(next(
        t for t in onnxmorph.load(hf.path).graph.initializer if t.name.endswith("layers.0.mlp.experts.gate_up_proj"))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_dynamo_moe_grows_with_its_written_out_shapes(hf_export, kind) -> None:  # noqa: F811
    hf = hf_export(kind, True)
    _check(hf, _grow(hf, 8, 4))
    _check(hf, _grow(hf, 12, 6, noise=0.5))


@pytest.mark.parametrize("experts,top_k,message", [
    (8, 2, "grows exactly only to m\\*4 experts with top-\\(m\\*2\\)"),
    (6, 3, "not 6 with top-3"),
    (5, 2, "never chosen and so never trained"),
])
def test_growing_an_moe_any_other_way_is_refused(hf_export, experts, top_k, message) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("mixtral", False).path)
    with pytest.raises(onnxmorph.NotApplicable, match=message):
        onnxmorph.moe(parent, layer="0", experts=experts, top_k=top_k)
    with pytest.raises(onnxmorph.UsageError, match="--shards applies to upcycling"):
        onnxmorph.moe(parent, layer="0", experts=8, top_k=4, shards=2)


# --------------------------------------------------------------------------- command line and training


def test_cli_upcycles_and_refuses_in_one_line(hf_export, tmp_path: Path) -> None:  # noqa: F811
    path = hf_export("llama", False).path
    out = tmp_path / "moe.onnx"
    run = [sys.executable, "-m", "onnxmorph", "moe", str(path), "--layer", "0", "-o", str(out), "-q"]
    done = subprocess.run(run + ["--experts", "4", "--top-k", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert onnx.load(str(out)).graph.node
    bad = tmp_path / "bad.onnx"
    for flags in (["--experts", "4", "--top-k", "2", "--shards", "4"], ["--experts", "0", "--top-k", "1"],
                  ["--experts", "4", "--top-k", "2", "--routing", "sigmoid"]):
        done = subprocess.run(run[:-3] + ["-o", str(bad)] + flags, capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and not bad.exists()


def test_the_upcycled_gpt_trains_its_router() -> None:
    torch = pytest.importorskip("torch")
    from onnxmorph.experiments import lm
    from onnxmorph.train import adapter as ot

    torch.manual_seed(0)
    parent = lm.export(lm.GPT(lm.GPTConfig(2, 32, 4, 16), 0))
    child = onnxmorph.moe(parent, layer="0", experts=4, top_k=2)
    net = ot.to_torch(child)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16)))
    y = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 16)))
    np.testing.assert_allclose(net(x).detach().numpy(), _session(child).run(None, {"tokens": x.numpy()})[0],
                               atol=1e-5, rtol=1e-5)
    params = net.onnx_parameters()
    router = next(name for name in params if name.endswith("morph_moe/router/weight"))
    before = params[router].detach().clone()
    downs = sorted(name for name in params if "blocks.0" in name or "morph_moe" in name)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    grads = []
    for _ in range(3):
        optimiser.zero_grad()
        lm.lm_loss(net(x), y).backward()
        grads.append(float(params[router].grad.abs().max()))
        optimiser.step()
    # equal experts make the output independent of the routing weights: no gradient at the start, one as soon
    # as the experts have moved apart (each saw other tokens with other weights)
    assert grads[0] < 1e-6 < grads[2]
    assert float((params[router].detach() - before).abs().max()) > 1e-4
    assert downs


def test_the_cost_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/moe_cost.py --quick: the dense graph computes every expert, top-k would need k of them."""
    import importlib.util
    import json

    script = Path(__file__).parent.parent / "benchmarks" / "moe_cost.py"
    spec = importlib.util.spec_from_file_location("moe_cost", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path / "cost.json")]) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "cost.json").read_text())["rows"]}
    assert rows["8 experts, top-2"]["dense_flops_ratio"] > rows["4 experts, top-2"]["dense_flops_ratio"] > 1.5
    assert rows["8 experts, top-2"]["active_flops_ratio"] == pytest.approx(
        rows["4 experts, top-2"]["active_flops_ratio"], rel=0.05)
    assert rows["4 shards, all active"]["dense_flops_ratio"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_a_grown_moe_trains_and_its_copies_separate_only_with_noise(hf_export, noise) -> None:  # noqa: F811
    """Copies share their expert's logit, so they are always chosen together with equal weights: without the
    rescaling they get the same gradients and stay equal; with it they move apart, router rows included."""
    torch = pytest.importorskip("torch")
    from onnxmorph.train import adapter as ot

    hf = hf_export("mixtral", False)
    child = _grow(hf, 8, 4, noise=noise)
    net = ot.to_torch(child)
    feed = hf.feed(seed=3, batch=2, sequence=8)
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    np.testing.assert_allclose(net(**inputs).detach().numpy(), hf.logits(feed), atol=1e-4, rtol=1e-4)
    params = net.onnx_parameters()
    router = next(p for name, p in params.items() if name.endswith("morph_moe/router_weight"))
    torch.manual_seed(0)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    target = torch.from_numpy(np.random.default_rng(4).integers(0, 100, (2, 8)))
    for _ in range(3):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(**inputs).reshape(-1, 100), target.reshape(-1)).backward()
        optimiser.step()
    rows = router.detach().numpy()
    rows = rows if rows.shape[0] == 8 else rows.T  # [experts, hidden]
    apart = float(np.abs(rows[:4] - rows[4:]).max())
    assert (apart > 1e-3) if noise else (apart < 1e-6), apart


def test_qwen_moes_shared_expert_upcycles_inside_its_moe(hf_export) -> None:  # noqa: F811
    """Qwen2-MoE's shared expert is an FFN on the 2-d tokens beside the routed experts: it becomes experts too."""
    hf = hf_export("qwen2_moe", False)
    parent = onnxmorph.load(hf.path)
    child, report = onnxmorph.morph(parent, "moe", layer="model.model.layers.0.mlp.shared_expert", experts=4, top_k=2)
    assert report, report.summary()
    _check(hf, child)
    names = {m["name"]: m for m in onnxmorph.inspect(child)["experts"]["moes"]}
    assert names["model.model.layers.0.mlp.shared_expert"]["experts"] == 4  # beside the 4 routed experts of layer 0
    assert names["model.model.layers.0.mlp"]["form"] == "stacked"


def test_diff_draws_each_expert_copy_as_one_box(hf_export, tmp_path: Path) -> None:  # noqa: F811
    from onnxmorph.diff import diff, write_page

    path = hf_export("gpt2", False).path
    child = tmp_path / "moe.onnx"
    onnxmorph.save(onnxmorph.moe(path, layer="0", experts=4, top_k=2, shared_expert="copy"), child)
    d = diff(path, child)
    [group] = d.groups
    assert group["morph"] == "moe" and group["step"]["index"] == 1  # named by `--layer 0`, matched all the same
    text = str(d)
    for copy in ("expert_1", "expert_2", "expert_3", "shared_expert"):
        assert sum(f"/morph_moe/{copy}/...  " in line for line in text.splitlines()) == 1, copy
    page = write_page(d, tmp_path / "diff.html").read_text()
    assert page.count("data-bundle=") == 4 and page.count('class="node added"') < 20
