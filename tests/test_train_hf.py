"""onnxmorph.train on the Hugging Face zoo (tests/hf_support.py): every family and exporter runs in torch as in
onnxruntime, its gradients are the Hugging Face model's own, and a grown child keeps training from its parent's loss.

TorchScript exports of every family run by default (about a second each); dynamo exports run under `-m slow`,
except Llama's, which other default tests export too (the session fixture exports each model once).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hf_support import ALL_KINDS, VOCAB, HFModel, build_module, facts, hf_export  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import onnxmorph  # noqa: E402
from onnxmorph import train as ot  # noqa: E402
from onnxmorph.errors import NotApplicable  # noqa: E402

torch.set_num_threads(1)

RTOL, ATOL = 1e-4, 1e-5
DEFAULT_DYNAMO = ("llama",)
CASES = [pytest.param(kind, False, id=f"{kind}-torchscript") for kind in ALL_KINDS] + \
    [pytest.param(kind, True, id=f"{kind}-dynamo", marks=[] if kind in DEFAULT_DYNAMO else [pytest.mark.slow])
     for kind in ALL_KINDS]


def _session(model: onnx.ModelProto | Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _tensors(feed: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: torch.from_numpy(array) for name, array in feed.items()}


def _feeds(hf: HFModel) -> dict[str, dict[str, np.ndarray]]:
    """Inputs none of which is the tracing example: a padded batch (a row whose last 3 tokens are masked), another
    batch and sequence length, one token."""
    padded = hf.feed(seed=1, batch=2, sequence=8)
    if "attention_mask" in padded:
        padded["attention_mask"][0, -3:] = 0
    return {"padded": padded, "3 x 5": hf.feed(seed=2, batch=3, sequence=5),
            "one token": hf.feed(seed=3, batch=1, sequence=4 if hf.kind == "wav2vec2" else 1)}


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_runs_as_onnxruntime_runs(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    net = ot.to_torch(hf.path)
    session = _session(hf.path)
    for name, feed in _feeds(hf).items():
        expected = session.run(None, feed)[0]
        with torch.no_grad():
            got = net(**_tensors(feed)).numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"{hf.label} on {name}")


# ---- gradients: those of the Hugging Face model that was exported


def _loss(output: Any, kind: str) -> Any:
    """A loss that reads every output element: cross-entropy of the logits on fixed labels, else a mean square."""
    if output.dim() == 3 and facts(kind)["head"] in ("causal_lm", "masked_lm"):
        labels = torch.arange(output.shape[0] * output.shape[1]) % VOCAB
        return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), labels)
    return (output * torch.linspace(-1, 1, output.shape[-1])).pow(2).mean()


# Weights the exporters fold with the buffers that index or rescale them: the folded tensor trains instead.
# Gemma's norms (1 + weight) are matched as weight + 1.
FOLDED = {"swin": "relative_position_bias_table", "wav2vec2": "pos_conv_embed.conv.parametrizations"}


def _hf_match(value: Any, hf_params: dict[str, Any], plus_one: bool) -> tuple[str, bool] | None:
    """The Hugging Face parameter that an ONNX weight is (transposed or not; shifted by one for Gemma's norms)."""
    for name, param in hf_params.items():
        reference = param.detach() + 1 if plus_one and param.dim() == 1 and "norm" in name else param.detach()
        if reference.shape == value.shape and torch.equal(reference, value):
            return name, False
        if reference.dim() == 2 and reference.t().shape == value.shape and torch.equal(reference.t(), value):
            return name, True
    return None


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_gradients_are_those_of_the_hugging_face_model(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    feed = _feeds(hf)["padded"]
    hf_params = dict(hf.hf_model.named_parameters())
    wanted = [p for p in hf_params.values() if p.requires_grad]
    hf_loss = _loss(hf.module(*[torch.from_numpy(feed[n]) for n in hf.input_names]), kind)
    hf_grads = dict(zip([n for n, p in hf_params.items() if p.requires_grad],
                        torch.autograd.grad(hf_loss, wanted, allow_unused=True)))

    net = ot.to_torch(hf.path)
    onnx_params = {name: p for name, p in net.onnx_parameters().items() if p.requires_grad}
    loss = _loss(net(**_tensors(feed)), kind)
    np.testing.assert_allclose(loss.item(), hf_loss.item(), rtol=1e-5)
    grads = dict(zip(onnx_params, torch.autograd.grad(loss, list(onnx_params.values()))))

    summed: dict[str, Any] = {}
    unmatched = []
    for name, param in onnx_params.items():
        match = _hf_match(param.detach(), hf_params, facts(kind)["norm_plus_one"])
        if match is None:
            unmatched.append(name)
            continue
        grad = grads[name].t() if match[1] else grads[name]
        summed[match[0]] = summed.get(match[0], 0) + grad
    assert not unmatched or kind in FOLDED, f"ONNX weights that are no Hugging Face parameter: {unmatched}"
    scale = max(float(g.abs().max()) for g in hf_grads.values() if g is not None)
    for name, reference in hf_grads.items():
        if name not in summed:
            # only a weight the exporter folded, or one the forward pass does not use, has no ONNX tensor
            assert FOLDED.get(kind, "-") in name or reference is None, name
            continue
        np.testing.assert_allclose(summed[name].numpy(), reference.numpy(), rtol=1e-3, atol=1e-5 * scale,
                                   err_msg=f"{hf.label}: gradient of {name}")


# ---- a grown child keeps training

# The identity block (LLaMA Pro) where `block` grows the family today; the others grow their hidden width 2x
# by net2net (post-norm BERT; the parallel and sandwich-norm blocks, whose branch does not end in a projection).
WIDEN = ("bert", "falcon", "gemma2", "gemma3", "gpt_neox", "olmo2", "opt", "phi")
GROWTHS = [pytest.param(kind, False, "widen" if kind in WIDEN else "block", id=f"{kind}-torchscript")
           for kind in ALL_KINDS] + \
    [pytest.param(kind, False, "widen", id=f"{kind}-torchscript-widen") for kind in ("llama", "gpt2")] + \
    [pytest.param(kind, True, "widen" if kind in WIDEN else "block", id=f"{kind}-dynamo",
                  marks=[] if kind in DEFAULT_DYNAMO else [pytest.mark.slow]) for kind in ALL_KINDS]


def _grow(parent: onnx.ModelProto, growth: str) -> onnx.ModelProto:
    if growth == "block":
        return onnxmorph.block(parent, after=0)
    # The residual stream's width, from a layer that writes it: the attention output, else the first one net2net
    # takes (inspect finds no attention in OPT's and Gemma 2's graphs).
    info = onnxmorph.inspect(parent)
    layers = [a["output"] for a in info["attention"]] + [layer["name"] for layer in info["layers"]]
    for name in layers:
        try:
            return onnxmorph.widen(parent, layer=name, width=2 * 32, method="net2net")
        except NotApplicable:
            continue
    raise AssertionError("no layer widens")


def _batch(hf: HFModel, parent: ot.OnnxModule) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """A fixed batch of 4, its targets and the loss that fits the family's head."""
    rng = np.random.default_rng(0)
    feed = hf.feed(seed=4, batch=4, sequence=8)
    head = facts(hf.kind)["head"]
    if head == "causal_lm":
        feed["attention_mask"][0, -3:] = 0  # the labels skip the padding (causal_lm_labels)
        return feed, None, "causal_lm"
    if head == "masked_lm":
        return feed, np.where(rng.random((4, 8)) < 0.3, rng.integers(0, VOCAB, (4, 8)), ot.IGNORE_INDEX), \
            "token_cross_entropy"
    if head == "image_classification":
        return feed, rng.integers(0, 10, 4), "cross_entropy"
    with torch.no_grad():
        shape = parent(**_tensors(feed)).shape
    if head == "ctc":  # a class per audio frame
        return feed, rng.integers(0, shape[-1], shape[:2]), "token_cross_entropy"
    return feed, rng.standard_normal(shape).astype(np.float32), "mse"  # t5's encoder states


@pytest.mark.parametrize(("kind", "dynamo", "growth"), GROWTHS)
def test_a_grown_child_trains_from_its_parents_loss(hf_export, kind: str, dynamo: bool, growth: str) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    parent_model = onnxmorph.load(hf.path)
    child_model = _grow(parent_model, growth)
    parent, child = ot.to_torch(parent_model), ot.to_torch(child_model)
    feed, targets, loss = _batch(hf, parent)
    parent_loss = ot.fit(parent, feed, targets, loss=loss, steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))

    new = {name: p for name, p in child.onnx_parameters().items() if "/morph_block/" in name}
    assert bool(new) == (growth == "block")
    zero = [name for name, p in new.items() if not p.detach().any()]
    grads: list[dict[str, Any]] = []

    def keep_grads(step: int, value: float) -> None:
        grads.append({name: p.grad.detach().clone() for name, p in new.items() if p.grad is not None})

    optimizer = torch.optim.Adam([p for p in child.parameters() if p.requires_grad], lr=3e-3)
    losses = ot.fit(child, feed, targets, loss=loss, steps=6, batch_size=4, optimizer=optimizer, callback=keep_grads)
    assert abs(losses[0] - parent_loss[0]) <= 1e-5, (losses[0], parent_loss[0])  # the child starts where it was
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.02, losses
    writers = [name for name in zero if grads[0][name].abs().max() > 0]
    if growth == "block":
        # Step 0: the zero writers of the attention and the MLP have a gradient (whatever the block computes, they
        # add it times 0), nothing before them has; once they moved, it reaches every weight tensor of the block.
        # (the block pass copies an MoE block's attention sublayer only: one writer there)
        assert len(writers) >= (1 if facts(kind)["experts"] else 2), zero
        assert all(not grads[0][name].any() for name in new if name not in zero)
        for name, p in new.items():
            if p.dim() >= 2:
                assert grads[1][name].abs().max() > 0, name

    # The trained child goes back into its own graph, exactly.
    trained = ot.to_onnx(child)
    assert trained.graph.node == child_model.graph.node and trained.opset_import == child_model.opset_import
    assert [t.name for t in trained.graph.initializer] == [t.name for t in child_model.graph.initializer]
    assert trained.metadata_props == child_model.metadata_props
    moved = [t.name for t, old in zip(trained.graph.initializer, child_model.graph.initializer) if t != old]
    assert set(writers) <= set(moved) and len(moved) > len(writers)
    fresh = hf.feed(seed=9, batch=2, sequence=7)
    with torch.no_grad():
        expected = child(**_tensors(fresh)).numpy()
    np.testing.assert_allclose(_session(trained).run(None, fresh)[0], expected, rtol=RTOL, atol=ATOL)


# ---- fit on token ids with an attention mask


def test_fit_takes_named_inputs_and_skips_the_padding(hf_export) -> None:  # noqa: F811
    hf = hf_export("llama", False)
    net = ot.to_torch(hf.path)
    feed = hf.feed(seed=5, batch=4, sequence=8)
    feed["attention_mask"][1, -4:] = 0
    labels = ot.causal_lm_labels(feed["input_ids"], feed["attention_mask"])
    assert (labels[1, -4:] == ot.IGNORE_INDEX).all() and (labels[0] == torch.from_numpy(feed["input_ids"][0])).all()
    frozen = ot.to_torch(hf.path)
    zero = ot.fit(frozen, feed, loss="causal_lm", steps=1, batch_size=4, optimizer=lambda p: torch.optim.SGD(p, 0.0))
    # What the padding holds changes nothing: its keys are masked and its labels skipped.
    other = dict(feed, input_ids=feed["input_ids"].copy())
    other["input_ids"][1, -4:] = (other["input_ids"][1, -4:] + 17) % VOCAB
    assert ot.fit(frozen, other, loss="causal_lm", steps=1, batch_size=4,
                  optimizer=lambda p: torch.optim.SGD(p, 0.0)) == pytest.approx(zero, abs=1e-6)
    # The same loss by hand: logits at t predict the token at t + 1.
    with torch.no_grad():
        logits = net(**_tensors(feed))
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                ignore_index=ot.IGNORE_INDEX)
    assert zero[0] == pytest.approx(float(by_hand), abs=1e-6)
    # Positional inputs, in graph order, do the same; minibatches of 2 draw from a seeded permutation.
    losses = ot.fit(net, (feed["input_ids"], feed["attention_mask"]), labels, loss="causal_lm", steps=8, batch_size=2,
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1
    predicted = ot.predict(net, feed, batch_size=3)
    with torch.no_grad():
        np.testing.assert_allclose(predicted, net(**_tensors(feed)).numpy(), rtol=1e-6, atol=1e-6)


def test_fit_refuses_inputs_it_cannot_pair(hf_export) -> None:  # noqa: F811
    net = ot.to_torch(hf_export("llama", False).path)
    ids = np.zeros((4, 8), np.int64)
    with pytest.raises(onnxmorph.UsageError, match="same non-zero length"):
        ot.fit(net, {"input_ids": ids, "attention_mask": np.ones((3, 8), np.int64)}, loss="causal_lm", steps=1)
    with pytest.raises(onnxmorph.UsageError, match="targets are needed"):
        ot.fit(net, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, loss="mse", steps=1)
    with pytest.raises(onnxmorph.UsageError, match="unknown model input.*token_type_ids"):
        ot.fit(net, {"input_ids": ids, "token_type_ids": ids}, loss="causal_lm", steps=1)
    with pytest.raises(onnxmorph.UsageError, match="causal_lm needs logits"):
        ot.fit(net, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, np.zeros(4, np.int64), loss="causal_lm",
               steps=1)


# ---- what training keeps of the source model


def test_tied_embeddings_train_as_one_tensor(hf_export) -> None:  # noqa: F811
    hf = hf_export("gpt2", False)
    net = ot.to_torch(hf.path)
    assert len(net.tied) == 1  # the LM head, written by the exporter as the embedding's transpose
    (head, (table, transposed)), = net.tied.items()
    assert transposed and head not in net.onnx_parameters()
    feed = hf.feed(seed=6, batch=2, sequence=8)
    ot.fit(net, feed, loss="causal_lm", steps=2, batch_size=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in ot.to_onnx(net).graph.initializer}
    np.testing.assert_array_equal(values[head], values[table].T)
    untied = ot.to_torch(hf.path, tie_embeddings=False)
    assert not untied.tied and head in untied.onnx_parameters()


def test_buffers_of_the_source_model_stay_constants(hf_export) -> None:  # noqa: F811
    # Rotary frequencies (an initializer read only through Sin/Cos) and Swin's shifted-window mask (0 and -100)
    # are buffers in the Hugging Face model: they do not train.
    llama = ot.to_torch(hf_export("llama", True).path)
    frequencies = [name for name in llama.onnx_parameters() if "inv_freq" in name]
    assert frequencies and not any(llama.parameter(name).requires_grad for name in frequencies)
    hf_count = sum(p.numel() for p in hf_export("llama", True).hf_model.parameters())
    assert sum(p.numel() for p in llama.parameters() if p.requires_grad) == hf_count


@pytest.mark.slow
def test_the_shifted_window_mask_stays_a_constant(hf_export) -> None:  # noqa: F811
    swin = ot.to_torch(hf_export("swin", True).path)
    masks = [name for name, p in swin.onnx_parameters().items() if p.detach().min() == -100]
    assert masks and not any(swin.parameter(name).requires_grad for name in masks)


# ---- half precision and opset 23


def _export(module: Any, args: tuple[Any, ...], names: tuple[str, ...], path: Path, dynamo: bool,
            **options: Any) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            dim = torch.export.Dim.DYNAMIC
            shapes = {name: {0: dim, 1: dim} for name in names}
            torch.onnx.export(module, args, input_names=list(names), output_names=["logits"], dynamo=True,
                              dynamic_shapes=shapes, report=False, verify=False, **options).save(str(path))
        else:
            torch.onnx.export(module, args, str(path), input_names=list(names), output_names=["logits"], dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}, opset_version=17)


def test_a_float16_export_trains_on_float32_master_weights(tmp_path: Path) -> None:
    module, names = build_module("llama")
    module = module.half()
    hf = HFModel("llama", False, tmp_path / "llama16.onnx", module, names, 0.0)
    example = hf.feed()
    _export(module, tuple(torch.from_numpy(example[n]) for n in names), names, hf.path, dynamo=False)
    model = onnx.load(hf.path)
    net = ot.to_torch(model)
    assert {p.dtype for p in net.parameters()} == {torch.float32} and net._half
    feed = hf.feed(seed=2)
    with torch.no_grad():
        got = net(**_tensors(feed))
    assert got.dtype == torch.float16
    # float16 rounding: onnxruntime and torch differ by a few units in the last place of the logits (about 2.5)
    np.testing.assert_allclose(got.numpy(), _session(model).run(None, feed)[0], rtol=1e-2, atol=1e-2)
    losses = ot.fit(net, feed, loss="causal_lm", steps=3, batch_size=2, optimizer=lambda p: torch.optim.Adam(p, 1e-2))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    trained = ot.to_onnx(net)
    assert [t.data_type for t in trained.graph.initializer] == [t.data_type for t in model.graph.initializer]
    with torch.no_grad():
        np.testing.assert_allclose(_session(trained).run(None, feed)[0], net(**_tensors(feed)).numpy(), rtol=1e-2,
                                   atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2", "vit"])
def test_opset_23_attention_rotary_and_rms_norm(tmp_path: Path, kind: str) -> None:
    # scaled_dot_product_attention becomes ONNX Attention at opset 23, Llama's rotary embedding RotaryEmbedding and
    # its norm RMSNormalization.
    module, names = build_module(kind)
    module.model.config._attn_implementation = "sdpa"
    for sub in module.model.modules():
        if hasattr(sub, "config"):
            sub.config._attn_implementation = "sdpa"
    hf = HFModel(kind, True, tmp_path / f"{kind}23.onnx", module, names, 0.0)
    example = hf.feed()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        dim = torch.export.Dim.DYNAMIC
        shapes = {("signal" if n == "pixel_values" else n): ({0: dim} if n == "pixel_values" else {0: dim, 1: dim})
                  for n in names}
        torch.onnx.export(module, tuple(torch.from_numpy(example[n]) for n in names), input_names=list(names),
                          output_names=["logits"], dynamo=True, dynamic_shapes=shapes, opset_version=23, report=False,
                          verify=False).save(str(hf.path))
    model = onnx.load(hf.path)
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" in ops and (kind != "llama" or {"RotaryEmbedding", "RMSNormalization"} <= ops)
    net = ot.to_torch(model)
    # onnxruntime 1.32 runs the exported RotaryEmbedding for a batch of one only; the eager model runs any batch.
    for feed in (hf.feed(seed=1, batch=1), hf.feed(seed=2, batch=3, sequence=5)):
        with torch.no_grad():
            got = net(**_tensors(feed)).numpy()
        np.testing.assert_allclose(got, hf.logits(feed), rtol=RTOL, atol=ATOL)
        if len(next(iter(feed.values()))) == 1:
            np.testing.assert_allclose(got, _session(model).run(None, feed)[0], rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_a_bfloat16_dynamo_export_runs_as_the_eager_model(tmp_path: Path) -> None:
    # onnxruntime has no CPU kernels for bfloat16 matrix products: the eager model is the reference.
    module, names = build_module("llama")
    module = module.to(torch.bfloat16)
    hf = HFModel("llama", True, tmp_path / "llama_bf16.onnx", module, names, 0.0)
    example = hf.feed()
    _export(module, tuple(torch.from_numpy(example[n]) for n in names), names, hf.path, dynamo=True)
    net = ot.to_torch(hf.path)
    feed = hf.feed(seed=3)
    with torch.no_grad():
        got = net(**_tensors(feed))
        expected = module(*[torch.from_numpy(feed[n]) for n in names])
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), expected.float().numpy(), rtol=2e-2, atol=2e-2)
    losses = ot.fit(net, feed, loss="causal_lm", steps=3, batch_size=2, optimizer=lambda p: torch.optim.Adam(p, 1e-2))
    assert losses[-1] < losses[0]
    trained = ot.to_onnx(net)
    assert {t.data_type for t in trained.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
