"""Widen on tiny Hugging Face exports (tests/hf_support.py): targets computed at run time."""

from __future__ import annotations

import pytest
from hf_support import hf_export  # noqa: F401  (fixture)

import onnxmorph
from onnxmorph.graph import core as mgraph


def _widen_every_layer(path: str, factor: int) -> tuple[int, int]:
    """(verified, tried): every MatMul/Gemm whose output is not a graph output, widened `factor`x by net2net."""
    model = onnxmorph.load(path, normalize_model=True)
    analysis = mgraph.Analysis(model)
    outputs = {o.name for o in model.graph.output}
    verified = tried = 0
    for info in mgraph.layers(analysis.view):
        node = mgraph.find_layer(analysis.view, info.name)
        shape = analysis.shapes.get(node.outputs[0].name)
        if node.outputs[0].name in outputs or not shape or not shape[-1] or info.op == "Conv":
            continue
        tried += 1
        try:
            child, report = onnxmorph.morph(path, "widen", layer=info.name, width=factor * shape[-1],
                                            method="net2net")
        except onnxmorph.NotApplicable:
            continue
        assert report, report.summary()  # a child is written only when it verified; say so here too
        verified += 1
    return verified, tried


@pytest.mark.slow
def test_vit_dynamo_reshape_targets_computed_from_shape(hf_export) -> None:  # noqa: F811
    # The dynamo exporter writes ViT's reshapes as Concat(Shape(x)[...], [C]): the constant piece
    # that spells the channel count grows (before, 2 of these 12 layers widened; most others were refused
    # with "its target shape is computed").
    verified, tried = _widen_every_layer(str(hf_export("vit", True).path), 2)
    assert verified >= 6, (verified, tried)
