"""The block morph on exported Hugging Face transformers: a new pre-norm block after every block, exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hf_support import hf_export  # noqa: F401  (fixture)
from onnx import numpy_helper

import onnxmorph
from onnxmorph import cli
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph

PRE_NORM = [("gpt2", False), ("llama", False), ("vit", False), ("llama", True)]
PRE_NORM_SLOW = [("gpt2", True), ("vit", True), ("wav2vec2", False), ("wav2vec2", True)]


def _logits(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _grow_every_block(hf) -> None:
    parent = onnxmorph.load(hf.path, normalize_model=True)  # node counts compare with the morphed form
    found = mblocks.blocks(mgraph.read_view(parent))
    assert [b.kind for b in found] == ["pre-norm", "pre-norm"]
    feed = hf.feed(seed=5, batch=3, sequence=9)
    expected = hf.logits(feed)
    for block in found:
        child, report = onnxmorph.morph(parent, "block", after=block.index)
        assert report, report  # default tolerances, no flags
        grown = mblocks.blocks(mgraph.read_view(child))
        assert len(grown) == len(found) + 1
        assert len(child.graph.node) == len(parent.graph.node) + len(block.nodes)
        names = [n.name for n in child.graph.node]
        assert len(names) == len(set(names)), "new nodes must get unique names"
        np.testing.assert_allclose(_logits(child, feed), expected, atol=1e-4, rtol=1e-4)
        # The new block is on the path: its writers at zero are what keeps the function.
        writer = grown[block.index + 1].sublayers[0]
        weight = _writer_weight(child, writer.branch.name)
        assert np.count_nonzero(numpy_helper.to_array(weight)) == 0
        # (random: a constant matrix adds the same to every feature, which a LayerNorm then removes)
        noise = np.random.default_rng(0).normal(0, 0.1, list(weight.dims)).astype(np.float32)
        weight.CopyFrom(numpy_helper.from_array(noise, weight.name))
        assert not onnxmorph.verify(parent, child)


def _writer_weight(model: onnx.ModelProto, tensor: str) -> onnx.TensorProto:
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: t for t in model.graph.initializer}
    node = producers[tensor]
    while node.op_type not in ("MatMul", "Gemm") or node.input[1] not in weights:
        node = producers[next(i for i in node.input if i in producers)]
    return weights[node.input[1]]


@pytest.mark.parametrize(("kind", "dynamo"), PRE_NORM, ids=lambda v: str(v))
def test_a_block_after_every_pre_norm_block_is_exact(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    _grow_every_block(hf_export(kind, dynamo))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dynamo"), PRE_NORM_SLOW, ids=lambda v: str(v))
def test_a_block_after_every_pre_norm_block_is_exact_dynamo(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    _grow_every_block(hf_export(kind, dynamo))


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_post_norm_bert_is_refused_with_the_reason(hf_export, tmp_path: Path, capsys, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export("bert", dynamo)
    with pytest.raises(NotApplicable, match=r"block 0 \(model\.bert\.encoder\.layer\.0\) is post-norm "
                                            r"\(a LayerNormalization after its residual Adds\)"):
        onnxmorph.morph(hf.path, "block", after=0)
    out = tmp_path / "child.onnx"
    assert cli.main(["block", str(hf.path), "--after", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "post-norm" in err[0] and not out.exists()


def test_init_options_names_and_bad_references(hf_export, tmp_path: Path, capsys) -> None:  # noqa: F811
    hf = hf_export("llama", False)
    parent = onnxmorph.load(hf.path, normalize_model=True)  # node counts compare with the morphed form
    copied = onnxmorph.block(parent, after="model.model.layers.1")
    for init in ("random", "zero"):
        child, report = onnxmorph.morph(parent, "block", after=0, init=init, seed=3)
        assert report
    # With --init copy the new block's weights equal block 1's, under new names, and are not shared.
    weights = {t.name: numpy_helper.to_array(t) for t in copied.graph.initializer}
    new = [n for n in weights if "morph_block" in n]
    assert new and not set(new) & {t.name for t in parent.graph.initializer}
    originals = {t.name.lstrip("/"): numpy_helper.to_array(t) for t in parent.graph.initializer}
    zero = [n for n in new if not weights[n].any()]
    assert len(zero) == 2  # o_proj and down_proj
    for name in set(new) - set(zero):
        np.testing.assert_array_equal(weights[name], originals[name.split("/morph_block/", 1)[1]])
    with pytest.raises(UsageError, match=r"no block '7' \(blocks: 0 \(model\.model\.layers\.0\), 1"):
        onnxmorph.morph(parent, "block", after=7)
    out = tmp_path / "child.onnx"
    assert cli.main(["block", str(hf.path), "--after", "0", "--init", "random", "-o", str(out), "-q"]) == 0
    assert onnxmorph.verify(hf.path, out)


def _prenorm_stack(final_norm: bool) -> onnx.ModelProto:
    """Two pre-norm feed-forward blocks on a [N, 4, 8] stream; the last Add is the graph output unless `final_norm`."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights, nodes, x = [], [], "x"

    def const(name: str, array: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for k in range(2):
        nodes.append(helper.make_node("LayerNormalization", [x, const(f"g{k}", rng.uniform(0.5, 1.5, 8)),
                                                             const(f"b{k}", rng.normal(0, 0.1, 8))], [f"n{k}"],
                                      name=f"norm{k}", axis=-1))
        nodes.append(helper.make_node("MatMul", [f"n{k}", const(f"w{k}", rng.normal(0, 0.3, (8, 8)))], [f"f{k}"],
                                      name=f"ff{k}"))
        nodes.append(helper.make_node("Add", [x, f"f{k}"], [f"r{k}"], name=f"res{k}"))
        x = f"r{k}"
    outputs = [x]
    if final_norm:
        nodes.append(helper.make_node("LayerNormalization", [x, "g0", "b0"], ["y"], name="final", axis=-1))
        outputs = ["y"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4, 8]) for o in outputs],
                              initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_block_after_the_last_one_keeps_the_graph_output_name() -> None:
    parent = _prenorm_stack(final_norm=False)
    assert [b.kind for b in mblocks.blocks(mgraph.import_graph(parent))] == ["pre-norm", "pre-norm"]
    for after in (0, 1):
        child, report = onnxmorph.morph(parent, "block", after=after)
        assert report and [o.name for o in child.graph.output] == ["r1"]
        assert len(child.graph.node) == len(parent.graph.node) + 3
    # A block whose stream has no norm before its layer is still copied exactly (no norm after the Add).
    bare = _prenorm_stack(final_norm=True)
    for node in bare.graph.node:
        if node.name == "norm0":
            node.op_type, node.input[1:] = "Identity", []
            del node.attribute[:]
    assert [b.kind for b in mblocks.blocks(mgraph.import_graph(bare))] == ["no-norm", "pre-norm"]
    assert onnxmorph.morph(bare, "block", after=0)[1]
