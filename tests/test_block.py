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
from onnxmorph import blocks as mblocks
from onnxmorph import cli
from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable, UsageError

PRE_NORM = [("gpt2", False), ("llama", False), ("vit", False), ("llama", True)]
PRE_NORM_SLOW = [("gpt2", True), ("vit", True)]


def _logits(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _grow_every_block(hf) -> None:
    parent = onnxmorph.load(hf.path)
    found = mblocks.blocks(mgraph.read_view(parent))
    assert [b.kind for b in found] == ["pre-norm", "pre-norm"]
    feed = hf.feed(seed=5, batch=3, sequence=7) if hf.kind != "vit" else hf.feed(seed=5, batch=3)
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
    parent = onnxmorph.load(hf.path)
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
