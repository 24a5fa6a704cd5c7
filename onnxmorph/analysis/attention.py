"""Attention modules found on the graph: their query/key/value/output layers, heads, head size and key/value heads.

In an attention sublayer (see `onnxmorph.analysis.blocks`) the scores are a MatMul of two computed
tensors before a Softmax, and the Softmax output is multiplied by the values. Each of query, key
and value is traced back, inside the sublayer's branch (so rotary tables and masks from outside
are not followed), to its projection; the Reshape on the way that splits `H*d` into `(H, d)` gives
the head size d (the last entry of its target shape, constant or a Concat with a constant last
piece) and the head count H (the width entering the Reshape over d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis import blocks as mblocks
from onnxmorph.graph.core import ModelOrAnalysis, layer_info, model_of, producer, tensor_shapes

_SCORE_PATH = ("Add", "Mul", "Div", "Where", "Cast", "Softmax", "IsNaN", "Dropout", "Identity", "Sub")


@dataclass
class Projection:
    layer: str
    heads: int | None
    head_dim: int | None


def _computed(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]


def _nearest_product(start: gs.Node, members: set[int], neighbours: Callable[[gs.Node], list[gs.Node]]
                     ) -> gs.Node | None:
    """The first MatMul of two computed tensors reached from `start` through score-path ops, inside the sublayer."""
    stack = [start]
    while stack:
        node = stack.pop()
        for near in neighbours(node):
            if id(near) not in members:
                continue
            if near.op == "MatMul" and len(_computed(near)) == 2:
                return near
            if near.op in _SCORE_PATH:
                stack.append(near)
    return None


def _producers(node: gs.Node) -> list[gs.Node]:
    return [p for p in (producer(t) for t in _computed(node)) if p is not None]


def _score_matmuls(sub: mblocks.Sublayer) -> tuple[gs.Node, gs.Node] | None:
    """(scores MatMul, probabilities-times-values MatMul) around the first Softmax of `sub`."""
    members = {id(n) for n in sub.nodes}
    softmax = next((n for n in sub.nodes if n.op == "Softmax"), None)
    if softmax is None:
        return None
    scores = _nearest_product(softmax, members, _producers)
    values = _nearest_product(softmax, members, lambda node: list(node.outputs[0].outputs))
    return (scores, values) if scores is not None and values is not None else None


def _shape_entries(tensor: gs.Tensor) -> list[int | None]:
    """The entries of a Reshape target: constant, or a Concat of constant and computed pieces (None)."""
    if isinstance(tensor, gs.Constant):
        return [int(v) for v in np.asarray(tensor.values).ravel()]
    node = producer(tensor)
    if node is None or node.op != "Concat":
        return []
    entries: list[int | None] = []
    for piece in node.inputs:
        if isinstance(piece, gs.Constant):
            entries += [int(v) for v in np.asarray(piece.values).ravel()]
        else:
            entries += [None] * (int(piece.shape[0]) if piece.shape and isinstance(piece.shape[0], int) else 1)
    return entries


def _trace(tensor: gs.Tensor, members: set[int], shapes: dict[str, Any]) -> Projection | None:
    """The projection that `tensor` comes from inside the branch, with the head split on the way."""
    split: tuple[int | None, int | None] | None = None
    stack = [tensor]
    seen: set[str] = set()
    while stack:
        current = stack.pop(0)
        node = producer(current)
        if node is None or id(node) not in members or current.name in seen:
            continue
        seen.add(current.name)
        if layer_info(node) is not None:
            heads, head_dim = split if split is not None else (None, None)
            return Projection(node.name, heads, head_dim)
        if node.op == "Reshape":
            entries = _shape_entries(node.inputs[1])
            width = (shapes.get(node.inputs[0].name) or (None,))[-1]
            rank = len(shapes.get(node.inputs[0].name) or ())
            d = entries[-1] if entries and entries[-1] and entries[-1] > 0 else None
            h = entries[-2] if d and entries[-2] and entries[-2] > 0 else (width // d if d and width else None)
            # A split of H*d into (H, d), not a Reshape that restores [batch, seq, C] around a 2-D Gemm.
            if d and h and rank and len(entries) == rank + 1 and (width == h * d > d if width else h > 1):
                split = (h, d)  # the last split seen walking back is the one next to the projection
        stack.extend(_computed(node))
    return None


def attention_modules(model: ModelOrAnalysis, graph: gs.Graph,
                      found: list[mblocks.Block] | None = None) -> list[dict[str, Any]]:
    """One entry per attention sublayer: the layers (names `widen`/`deepen` take), heads, head size, key/value heads."""
    modules = mblocks.node_modules(model_of(model))
    found = found if found is not None else mblocks.blocks(graph, modules)
    if not any(sub.attention for block in found for sub in block.sublayers):
        return []  # no shape inference for models without attention
    shapes = tensor_shapes(model)
    result = []
    for block in found:
        for sub in block.sublayers:
            pair = _score_matmuls(sub) if sub.attention else None
            if pair is None:
                continue
            members = {id(n) for n in sub.nodes}
            scores, values = pair
            q = _trace(scores.inputs[0], members, shapes)
            k = _trace(scores.inputs[1], members, shapes)
            v = _trace(values.inputs[1], members, shapes)
            if q is None:
                continue
            writer = _writer_name(sub)
            result.append({
                "layer": q.layer, "block": block.index,
                "module": mblocks.common_module([n for n in (q.layer, k and k.layer, v and v.layer, writer) if n],
                                                modules),
                "heads": q.heads, "head_dim": q.head_dim, "kv_heads": k.heads if k else None,
                "query": q.layer, "key": k.layer if k else None, "value": v.layer if v else None,
                "output": writer,
            })
    return result


def _writer_name(sub: mblocks.Sublayer) -> str | None:
    members = {id(n) for n in sub.nodes}
    node = producer(sub.branch)
    while node is not None and id(node) in members:
        if layer_info(node) is not None:
            return node.name
        computed = _computed(node)
        node = producer(computed[0]) if computed else None
    return None
