"""`grow`: a whole transformer grown in one verified pass, on the tiny Hugging Face zoo (tests/hf_support.py).

Every child verifies at the default tolerances and its logits match the eager Hugging Face model's
own on fresh inputs; its sizes (read back from the child's weights and attention) and the number of
steps are those of `facts(kind)` scaled. Also: the refusals, each in one line naming what stops it;
the CLI (dry run, receipt, recipe); a parent kept with external data; and the one name resolver that
every --layer/--after/--from/--to option goes through (module paths, output names, typos).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hf_support import facts, hf_export  # noqa: F401  (fixture)

import onnxmorph
from onnxmorph import cli
from onnxmorph.analysis import attention as mattention
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers
from onnxmorph.io import streaming

ROOT = Path(__file__).resolve().parent.parent

HYPERCLONING = {"hidden": "2x", "heads": "2x", "ffn": "2x", "layers": "+2"}
# Non-integer factors where an exact construction exists: average expansion of the stream, whole
# groups of heads (4 query heads in 2 groups -> 6 in 3), copies of some FFN units, one block more.
FRACTIONAL = {"hidden": "1.5x", "heads": "1.5x", "ffn": "1.5x", "layers": "3"}
# BERT is post-norm: tiling only, and no identity block (LayerNorm(x + 0) is not x).
POST_NORM = {"hidden": "2x", "heads": "2x", "ffn": "2x"}

CASES = [("gpt2", HYPERCLONING), ("llama", HYPERCLONING), ("qwen2", HYPERCLONING), ("mistral", HYPERCLONING),
         ("qwen3", HYPERCLONING), ("vit", HYPERCLONING), ("bert", POST_NORM), ("llama", FRACTIONAL),
         ("mistral", FRACTIONAL)]


def _ids(value: object) -> str:
    return {id(HYPERCLONING): "2x", id(FRACTIONAL): "1.5x", id(POST_NORM): "2x-no-layers"}.get(id(value), str(value))


def _scaled(size: int, spec: str | None) -> int:
    if spec is None:
        return size
    if spec.endswith("x"):
        return int(Fraction(spec[:-1]) * size)
    return size + int(spec[1:]) if spec.startswith("+") else int(spec)


def _measured(model: onnx.ModelProto) -> dict[str, object]:
    """The sizes of a model read from its weights, blocks and attention (not from grow's plan)."""
    analysis = mgraph.Analysis(model)
    found = mblocks.model_blocks(analysis)
    attention = mattention.attention_modules(analysis, analysis.view, found)
    view = analysis.view
    widths = {layers.out_channels(mgraph.find_layer(view, a["output"]), analysis.shapes)[1] for a in attention}
    shapes = [tuple(info.weight_shape) for info in mgraph.layers(view)]
    return {"blocks": len(found), "hidden": widths, "shapes": shapes,
            "heads": {(a["heads"], a["kv_heads"], a["head_dim"]) for a in attention}}


# Layers outside the blocks as wide as the stream, which --hidden grows with it: BertForMaskedLM's head transform.
OUTSIDE = {"bert": 1}


def _check_child(hf, options: dict[str, str]) -> onnx.ModelProto:
    fact = facts(hf.kind)
    parent = onnxmorph.load(hf.path)
    blocks, heads, kv, hidden, ffn = (fact[k] for k in ("layers", "heads", "kv_heads", "hidden_size", "ffn_size"))
    planned = onnxmorph.plan(parent, "grow", **options)
    new_blocks = _scaled(blocks, options.get("layers")) - blocks
    outside = OUTSIDE.get(hf.kind, 0) if "hidden" in options else 0
    assert len(planned["steps"]) == ("hidden" in options) + outside \
        + blocks * (("heads" in options) + ("ffn" in options)) + new_blocks, planned["steps"]
    child, report = onnxmorph.morph(parent, "grow", **options)
    assert report, report.summary()  # the default tolerances
    feed = hf.feed(seed=11, batch=3, sequence=9)
    session = ort.InferenceSession(child.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feed)[0], hf.logits(feed), atol=1e-4, rtol=1e-4)

    hidden2, heads2, ffn2 = (_scaled(v, options.get(k)) for k, v in (("hidden", hidden), ("heads", heads),
                                                                    ("ffn", ffn)))
    kv2 = heads2 // (heads // kv)
    sizes = _measured(child)
    if "hidden" in options and "heads" in options:  # nothing is left at the old width: one config describes it
        assert (hidden, hidden) not in sizes["shapes"], sizes["shapes"]
    assert sizes["blocks"] == blocks + new_blocks
    assert sizes["hidden"] == {hidden2}
    assert sizes["heads"] == {(heads2, kv2, fact["head_dim"])}
    # every block's FFN: gate and up (or the one input layer) hidden2 -> ffn2, the output layer ffn2 -> hidden2
    per_block = 3 if fact["gated_mlp"] else 2
    assert sum(1 for s in sizes["shapes"] if sorted(s) == sorted((hidden2, ffn2))) == per_block * sizes["blocks"]
    expected = {"hidden": [hidden, hidden2], "heads": [heads, heads2], "kv_heads": [kv, kv2], "ffn": [ffn, ffn2],
                "blocks": [blocks, blocks + new_blocks]}
    assert planned["sizes"] == {k: v for k, v in expected.items() if k in planned["sizes"]}
    (record,) = onnxmorph.history(child)
    assert record["steps"] == [{"pass": "grow", "params": {"hidden": None, "heads": None, "ffn": None, "layers": None,
                                                            **options, "seed": 0}}]
    return child


@pytest.mark.parametrize(("kind", "options"), CASES, ids=_ids)
def test_grow_torchscript_export(hf_export, kind: str, options: dict[str, str]) -> None:  # noqa: F811
    _check_child(hf_export(kind, False), options)


def test_grow_dynamo_export_and_its_module_paths(hf_export) -> None:  # noqa: F811
    hf = hf_export("vit", True)  # the quickest dynamo export of the zoo
    _check_child(hf, HYPERCLONING)
    # the dynamo exporter records module paths in node metadata: a layer is named by its module too
    view = mgraph.read_view(onnxmorph.load(hf.path))
    node = mgraph.find_layer(view, "model.vit.layers.1.mlp.fc1")
    assert mgraph.module_paths(view)[node.name] == "model.vit.layers.1.mlp.fc1"
    assert mgraph.find_layer(view, node.outputs[0].name) is node


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "options"), [c for c in CASES if c[0] != "vit"], ids=_ids)
def test_grow_dynamo_export(hf_export, kind: str, options: dict[str, str]) -> None:  # noqa: F811
    _check_child(hf_export(kind, True), options)


def test_ffn_units_are_new_where_copies_cannot_be_exact(hf_export, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    # TorchScript cuts Phi-3's fused gate_up projection with Slices whose halves a copy would cross: net2net
    # refuses that layer, and grow takes netmorph's new units (output weights at zero) there, saying so.
    hf = hf_export("phi3", False)
    steps = onnxmorph.plan(onnxmorph.load(hf.path), "grow", ffn="2x")["steps"]
    # the dry run checks the first step on the parent: it says which method and why
    assert "--method netmorph" in steps[0] and "(method netmorph: " in steps[0], steps[0]
    assert "re-arranges the widened channels" in steps[0], steps[0]
    with caplog.at_level(logging.INFO, logger="onnxmorph"):
        child = onnxmorph.grow(onnxmorph.load(hf.path), ffn="2x")  # verified against the parent, or it raises
    ffn = facts("phi3")["ffn_size"]
    shapes = _measured(child)["shapes"]
    assert sum(1 for shape in shapes if 4 * ffn in shape) == 2, shapes  # each block's fused gate_up: 2 x 2 x ffn
    assert sum(1 for shape in shapes if 2 * ffn in shape) == 2, shapes  # each down projection reads 2 x ffn
    feed = {i.name: np.random.default_rng(3).integers(0, 100, (2, 9)).astype(np.int64)
            for i in onnxmorph.load(hf.path).graph.input}
    want = ort.InferenceSession(hf.path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(child.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert any("method net2net refused" in r.getMessage() and "method netmorph instead" in r.getMessage()
               for r in caplog.records), \
        [r.getMessage()[:150] for r in caplog.records]


def test_hidden_grows_only_stream_wide_layers_outside_the_blocks(hf_export) -> None:  # noqa: F811
    # Beside the model, a layer as wide as the stream that does not read it, and one whose output has no rank
    # inference knows: --hidden leaves both alone and still plans (one unknown layer refused the plan before).
    from onnx import helper, numpy_helper

    model = onnxmorph.load(hf_export("llama", False).path)
    hidden = facts("llama")["hidden_size"]
    rng = np.random.default_rng(0)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((8, hidden)).astype(np.float32), "side_w"),
                              numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "dot_w")])
    graph.input.extend([helper.make_tensor_value_info("side_x", onnx.TensorProto.FLOAT, [4, 8]),
                        helper.make_tensor_value_info("dot_x", onnx.TensorProto.FLOAT, [8])])
    graph.node.extend([helper.make_node("MatMul", ["side_x", "side_w"], ["side_h"], name="side"),
                       helper.make_node("ReduceMax", ["side_h"], ["side_y"], name="side_max", keepdims=0),
                       helper.make_node("MatMul", ["dot_x", "dot_w"], ["dot_y"], name="dot")])
    graph.output.extend([helper.make_tensor_value_info("side_y", onnx.TensorProto.FLOAT, []),
                         helper.make_tensor_value_info("dot_y", onnx.TensorProto.FLOAT, [])])
    steps = onnxmorph.plan(model, "grow", hidden="2x")["steps"]
    assert len(steps) == 1 and "hidden 32 -> 64" in steps[0], steps
    child = onnxmorph.grow(model, hidden="2x")
    weights = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert weights["side_w"] == (8, hidden) and weights["dot_w"] == (8,)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("kind", "options", "reason"), [
    ("bert", {"hidden": "1.5x"}, r"--hidden 1.5x: 32 -> 48 is not a multiple of 32, and block 0 "
                                 r"\(model.bert.encoder.layer.0\) is post-norm .* an integer factor tiles exactly"),
    ("bert", {"layers": "+1"}, r"--layers \+1: block 1 .* is post-norm .* no new block after it starts as the "
                               "identity"),
    ("llama", {"heads": "5"}, r"--heads 5: 5 query heads are not whole groups of 2 .* 6, 8, 10 would be"),
    ("llama", {"hidden": "1.3x"}, r"--hidden 1.3x: 32 x 1.3 = 41.6 is not a whole number of channels"),
    ("llama", {"ffn": "48"}, r"--ffn 48: the model has 64 units already; grow does not shrink"),
    # T5's encoder hands its stream to the graph output: widening it would change the output
    ("t5", {"hidden": "2x"}, r"--hidden: step 1 of 1 \(hidden 32 -> 64, tiling.*\): graph output "
                             "'last_hidden_state' exposes the channels"),
    ("mixtral", {"ffn": "2x"}, r"--ffn: block 0 .* routes tokens to experts \(TopK .*\): a mixture of experts"),
])
def test_what_cannot_grow_exactly_is_refused_with_the_reason(hf_export, kind: str, options: dict[str, str],  # noqa: F811
                                                            reason: str) -> None:
    parent = onnxmorph.load(hf_export(kind, False).path)
    with pytest.raises(NotApplicable, match=reason):
        onnxmorph.grow(parent, **options)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "nothing to grow: give --hidden, --heads, --ffn or --layers"),
    ({"hidden": "1x", "layers": "+0"}, "nothing to grow: --hidden 1x, --layers \\+0 keeps every size as it is"),
    ({"hidden": "1.5"}, "a factor is written with an x"),
    ({"hidden": 1.5}, "write a factor as '1.5x'"),
    ({"heads": "two"}, "expected a factor"),
    ({"layers": "-1"}, "expected a factor"),
    ({"hidden": "0x"}, "expected a positive factor"),
    ({"hidden": "100000x"}, "over the limit"),
    ({"layers": "+100000"}, "over the limit"),
])
def test_bad_options_are_usage_errors(hf_export, options: dict, message: str) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("llama", False).path)
    with pytest.raises(UsageError, match=message):
        onnxmorph.grow(parent, **options)


# --------------------------------------------------------------------------- CLI, receipt, recipe


def test_cli_dry_run_lists_every_step_and_writes_nothing(hf_export, tmp_path: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture) -> None:
    hf = hf_export("llama", False)
    args = ["grow", str(hf.path), "--hidden", "2x", "--heads", "2x", "--ffn", "2x", "--layers", "+2", "--dry-run"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "sizes: hidden 32 -> 64, heads 4 -> 8, kv_heads 2 -> 4, ffn 64 -> 128, blocks 2 -> 4" in text
    steps = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(steps) == 7 and steps[0].startswith("  1. widen --layer /model/model/layers.0/self_attn/o_proj/MatMul "
                                                   "--width 64 --method net2net: hidden 32 -> 64, tiling")
    assert "gate_proj/MatMul --width 128 --method net2net" in steps[3] and "up_proj/MatMul with it (gated)" in steps[3]
    assert steps[-1].startswith("  7. block --after 0 --init copy")
    assert cli.main([*args, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["steps"]) == 7
    assert not list(tmp_path.iterdir())


def test_cli_grows_writes_the_receipt_and_refuses_in_one_line(hf_export, tmp_path: Path) -> None:  # noqa: F811
    hf = hf_export("bert", False)
    out = tmp_path / "child.onnx"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "onnxmorph", "grow", str(hf.path), "-o", str(out), "-q"]
    refused = subprocess.run([*run, "--hidden", "1.5x"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "post-norm" in refused.stderr
    assert not out.exists()
    assert cli.main(["grow", str(hf.path), "--hidden", "2x", "--ffn", "+16", "-o", str(out), "-q"]) == 0
    (record,) = onnxmorph.history(onnx.load(str(out)))
    assert record["steps"][0]["pass"] == "grow" and record["steps"][0]["params"]["ffn"] == "+16"
    assert record["verification"]["passed"]
    assert onnxmorph.verify(hf.path, out)


def test_a_recipe_step_can_grow(hf_export) -> None:  # noqa: F811
    hf = hf_export("gpt2", False)
    child = onnxmorph.apply(onnxmorph.load(hf.path), [{"morph": "grow", "heads": "+4", "layers": "+1"},
                                                       {"morph": "widen", "layer": "model.transformer.h.0.mlp.c_fc",
                                                        "width": 80}])
    sizes = _measured(child)
    assert sizes["blocks"] == 3 and sizes["heads"] == {(8, 8, 8)} and (32, 80) in sizes["shapes"]


def test_a_parent_with_external_data_grows_through_scratch_files_it_drops(hf_export, tmp_path: Path,  # noqa: F811
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    hf = hf_export("gpt2", False)
    parent = tmp_path / "parent.onnx"
    onnx.save_model(onnx.load(str(hf.path)), str(parent), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="parent.onnx.data", size_threshold=0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("ONNXMORPH_SCRATCH", str(scratch))
    monkeypatch.setattr(streaming, "SPILL_MIN_BYTES", 0)  # every computed weight spills, however tiny
    outcome = onnxmorph.run_passes(parent, [onnxmorph.get_pass("grow")(**HYPERCLONING)])
    assert outcome.report
    referenced = {next(e.value for e in t.external_data if e.key == "location")
                  for t in outcome.child.graph.initializer if streaming.is_reference(t)}
    spilled = {str(p) for p in scratch.rglob("*.bin")}
    # the hidden step rewrote every weight, later steps some again: only the child's own are left
    assert spilled and spilled <= referenced
    out = tmp_path / "child.onnx"
    assert cli.main(["grow", str(parent), "--hidden", "2x", "--layers", "+1", "-o", str(out), "-q"]) == 0
    assert (tmp_path / "child.onnx.data").is_file() and onnxmorph.verify(parent, out)


# --------------------------------------------------------------------------- names as inspect prints them


def test_a_layer_is_named_by_node_output_or_module_path(hf_export) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("llama", False).path)
    view = mgraph.read_view(parent)
    node = mgraph.find_layer(view, "model.model.layers.1.mlp.down_proj")
    assert node.name == "/model/model/layers.1/mlp/down_proj/MatMul"
    assert mgraph.find_layer(view, node.outputs[0].name) is node
    # a node lookup of a module is the node whose output leaves it
    assert mgraph.find_node(view, "model.model.layers.1.mlp") is node
    by_module = onnxmorph.widen(parent, layer="model.model.layers.0.mlp.up_proj", width=80, verify=False)
    by_name = onnxmorph.widen(parent, layer="/model/model/layers.0/mlp/up_proj/MatMul", width=80, verify=False)
    assert [t.SerializeToString() for t in by_module.graph.initializer] == \
        [t.SerializeToString() for t in by_name.graph.initializer]
    assert onnxmorph.plan(parent, "block", after="model.model.layers.1.mlp.down_proj")["after"] == 1
    assert onnxmorph.plan(parent, "block", after="model.model.layers.0")["after"] == 0


@pytest.mark.parametrize(("name", "message"), [
    ("model.model.layers.1.mlp.down_prj", r"no layer 'model.model.layers.1.mlp.down_prj' in the model; closest: "
                                          r"model.model.layers.1.mlp.down_proj, "),
    ("/model/model/layers.0/self_attn/q_proj/MatMull", r"closest: /model/model/layers.0/self_attn/q_proj/MatMul, "),
    ("model.model.layers.1.mlp", r"module 'model.model.layers.1.mlp' has 3 layers \(model.model.layers.1.mlp.gate_proj"
                                 r", model.model.layers.1.mlp.up_proj, model.model.layers.1.mlp.down_proj\); name one"),
    ("zzz", r"no layer 'zzz' in the model; no close match \(`inspect` lists them\)"),
])
def test_a_wrong_name_gets_the_closest_names_in_one_line(hf_export, name: str, message: str) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("llama", False).path)
    with pytest.raises(UsageError, match=message) as caught:
        onnxmorph.widen(parent, layer=name, width=80)
    assert "\n" not in str(caught.value)


def test_every_name_option_resolves_the_same_way_on_the_cli(hf_export, tmp_path: Path,  # noqa: F811
                                                            capsys: pytest.CaptureFixture) -> None:
    path = str(hf_export("llama", False).path)
    assert cli.main(["block", path, "--after", "model.model.layer.1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no block 'model.model.layer.1'" in err and "closest: model.model.layers.1" in err
    assert cli.main(["skip", path, "--from", "model.model.layers.0.mlp.up_prj", "--to", "model.model.layers.1",
                     "--dry-run"]) == 2
    assert "closest: model.model.layers.0.mlp.up_proj" in capsys.readouterr().err
    assert cli.main(["widen", path, "--layer", "model.model.layers.0.mlp.gate_proj", "--width", "96", "--dry-run",
                     "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["width"] == 96 and "/model/model/layers.0/mlp/up_proj/MatMul" in plan["coupled"]
