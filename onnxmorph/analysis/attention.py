"""Attention modules found on the graph: their query/key/value/output layers, heads, head size and key/value heads.

In an attention sublayer (see `onnxmorph.analysis.blocks`) the scores are a MatMul of two computed
tensors before a Softmax, and the Softmax output is multiplied by the values. Each of query, key
and value is traced back, inside the sublayer's branch (so rotary tables and masks from outside
are not followed), to its projection; the Reshape on the way that splits `H*d` into `(H, d)` gives
the head size d (the last entry of its target shape, constant or a Concat with a constant last
piece) and the head count H (the width entering the Reshape over d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis import blocks as mblocks
from onnxmorph.analysis import shape_eval, sizes
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import ModelOrAnalysis, layer_info, model_of, producer, tensor_shapes


@dataclass
class Projection:
    layer: str
    heads: int | None
    head_dim: int | None


def _computed(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]


def _score_matmuls(sub: mblocks.Sublayer) -> tuple[gs.Node, gs.Node] | None:
    """(scores MatMul, probabilities-times-values MatMul) around the attention Softmax of `sub`."""
    core = mblocks.attention_core(sub.nodes)
    return (core[1], core[2]) if core is not None else None


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


_SAME_AXES = ("Cast", "Identity", "Dropout", "Neg", "Relu", "Tanh", "Sigmoid", "LayerNormalization",
              "SimplifiedLayerNormalization", "RMSNormalization", "Softmax")


def _reshape_groups(before: tuple, after: tuple) -> list[tuple[list[int], list[int]]] | None:
    """The axes of `before` and `after` paired in runs of equal size (a reshape's merges and splits, in order);
    an unknown size pairs only with an unknown size."""
    groups, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        ins, outs = [i], [j]
        a, b = before[i], after[j]
        if a is None or b is None:
            if a is not None or b is not None:
                return None
        else:
            while a != b:
                if a < b and i + 1 < len(before) and before[i + 1] is not None:
                    i += 1
                    ins.append(i)
                    a *= before[i]
                elif b < a and j + 1 < len(after) and after[j + 1] is not None:
                    j += 1
                    outs.append(j)
                    b *= after[j]
                else:
                    return None
        groups.append((ins, outs))
        i, j = i + 1, j + 1
    while i < len(before) and before[i] == 1:  # trailing unit axes
        groups[-1][0].append(i) if groups else None
        i += 1
    while j < len(after) and after[j] == 1:
        groups[-1][1].append(j) if groups else None
        j += 1
    return groups if i == len(before) and j == len(after) else None


def _count(shape: tuple | None, axes: set[int]) -> int | None:
    if shape is None or any(a >= len(shape) or shape[a] is None for a in axes):
        return None
    return int(np.prod([shape[a] for a in axes])) if axes else 1


def _heads(operand: gs.Tensor, members: set[int], shapes: dict[str, Any]) -> int | None:
    """The heads `operand` of an attention product holds, counted where its projection's channels were split into
    heads: walking back from the operand's head axes (those before its last two, batch aside) through transposes,
    rotary arithmetic and the repetition of key/value heads (an Expand/Tile of a unit axis: grouped-query
    attention), up to the Reshape that splits the channels into (heads, head size), or up to a Slice/Split of the
    head axis (Falcon's fused query/key/value heads). Where a Slice of the last axis cut the head size out of the
    split (GPT-NeoX's interleaved [H, 3d]) the heads are the split's.

    A three-axis operand ([B*H, T, d]: BLOOM's batched products) holds the heads merged with the batch: its first
    axis is followed back to the Reshape that merged them, and the batch is left out there; an operand whose first
    axis is never shown to be such a merge (single-head attention on [B, T, d]) gives None."""
    shape = shapes.get(operand.name)
    if shape is None or len(shape) < 3:
        return None
    merged = len(shape) == 3
    axes, tensor = ({0} if merged else set(range(1, len(shape) - 2))), operand

    def count(shape: tuple | None, axes: set[int]) -> int | None:
        return None if merged else _count(shape, axes)

    while True:
        node = producer(tensor)
        shape = shapes.get(tensor.name)
        if node is None or id(node) not in members or shape is None or layer_info(node) is not None:
            return count(shape, axes)
        data = node.inputs[0]
        before = shapes.get(data.name) if data.name else None
        if node.op == "Transpose":
            perm = [int(p) for p in node.attrs.get("perm", range(len(shape) - 1, -1, -1))]
            axes = {perm[a] for a in axes}
        elif node.op in ("Slice", "Split"):
            if before is None or len(before) != len(shape):
                return count(shape, axes)
            if any(before[a] != shape[a] for a in axes):
                return count(shape, axes)  # the heads were cut out of a wider tensor here
        elif node.op in ("Expand", "Tile"):
            if before is None:
                return count(shape, axes)
            offset = len(shape) - len(before)
            axes = {a - offset for a in axes if a - offset >= 0 and not (before[a - offset] == 1 != shape[a])}
        elif node.op == "Unsqueeze":
            given = (shape_eval.Evaluator(shapes).values(node.inputs[1]) if len(node.inputs) > 1
                     else [int(a) for a in node.attrs.get("axes", [])])
            if not given or None in given:
                return count(shape, axes)
            inserted = {a % len(shape) for a in given}  # type: ignore[operator]
            kept = [a for a in range(len(shape)) if a not in inserted]
            axes = {kept.index(a) for a in axes if a in kept}
        elif node.op in ("Reshape", "Squeeze", "Flatten"):
            groups = _reshape_groups(before, shape) if before is not None else None
            if groups is None:
                return count(shape, axes)
            mapped: set[int] = set()
            for ins, outs in groups:
                if not axes & set(outs):
                    continue
                wide = {o for o in outs if shape[o] != 1}  # a unit axis beside the heads is a batch of 1
                if len(ins) == 1 and len(wide) > 1 and (before[ins[0]] or 0) > 1 and axes & wide != wide:
                    return count(shape, axes)  # the split of the channels into heads
                if merged and outs == [0] and len(ins) > 1 and ins[0] == 0:
                    ins = ins[1:]  # [B, H, ...] -> [B*H, ...]: the batch leaves, the heads go on
                    merged = False
                mapped |= {i for i in ins if before[i] != 1 or len(ins) == 1}
            axes = mapped
        elif node.op in _SAME_AXES:
            pass
        elif node.op in ("Add", "Mul", "Sub", "Div", "Concat", "Where"):
            # rotary embedding and scaling: the operand of the same shape carries the heads (a Concat along the head
            # size joins a tensor's rotated and passed parts; along a head axis it would not be one tensor's heads)
            if node.op == "Concat" and int(node.attrs.get("axis", 0)) % len(shape) in axes:
                return count(shape, axes)
            same = [t for t in _computed(node) if shapes.get(t.name) is not None and len(shapes[t.name]) == len(shape)
                    and all(shapes[t.name][a] == shape[a] for a in axes)]
            if not same:
                return count(shape, axes)
            data = same[0]
        else:
            return count(shape, axes)
        tensor = data


def attention_modules(model: ModelOrAnalysis, graph: gs.Graph,
                      found: list[mblocks.Block] | None = None) -> list[dict[str, Any]]:
    """One entry per attention sublayer: the layers (names `widen`/`deepen` take), heads, head size, key/value heads.

    Heads and head size are read from the shapes at the attention's products (completed by evaluating the shape
    arithmetic that inference leaves out, `onnxmorph.analysis.shape_eval`); where those are unknown, from the
    Reshape that splits the query projection's channels.
    """
    modules = mblocks.node_modules(model_of(model))
    found = found if found is not None else mblocks.blocks(graph, modules)
    if not any(sub.attention for block in found for sub in block.sublayers):
        return []  # no shape inference for models without attention
    inferred = tensor_shapes(model)
    # with generic numbers for the dynamic sizes (a sequence length), a reshape's -1 next to one is still known
    generic = sizes.analysis_shapes(mgraph.analysis(model))
    result = []
    for block in found:
        for sub in block.sublayers:
            core = mblocks.attention_core(sub.nodes) if sub.attention else None
            if core is None:
                continue
            members = {id(n) for n in sub.nodes}
            _softmax, scores, values = core
            shapes = generic
            q = _trace(scores.inputs[0], members, inferred)
            k = _trace(scores.inputs[1], members, inferred)
            v = _trace(values.inputs[1], members, inferred)
            if q is None:
                continue
            writer = _writer_name(sub, values)
            query_shape = shapes.get(scores.inputs[0].name)
            head_dim = query_shape[-1] if query_shape and len(query_shape) >= 3 and query_shape[-1] else q.head_dim
            heads = _heads(scores.inputs[0], members, shapes) or q.heads
            kv_heads = _heads(scores.inputs[1], members, shapes) or (k.heads if k else None)
            result.append({
                "layer": q.layer, "block": block.index,
                "module": mblocks.common_module([n for n in (q.layer, k and k.layer, v and v.layer, writer) if n],
                                                modules),
                "heads": heads, "head_dim": head_dim, "kv_heads": kv_heads,
                "query": q.layer, "key": k.layer if k else None, "value": v.layer if v else None,
                "output": writer,
            })
    return result


def _writer_name(sub: mblocks.Sublayer, values: gs.Node) -> str | None:
    """The first layer after the attention's values product: its output projection (in a parallel block the branch
    also holds the MLP, so the walk goes forward from the attention, not back from the residual Add)."""
    members = {id(n) for n in sub.nodes}
    frontier, seen = [values], set()
    while frontier:
        node = frontier.pop(0)
        for tensor in node.outputs:
            for reader in tensor.outputs:
                if id(reader) not in members or id(reader) in seen:
                    continue
                seen.add(id(reader))
                if layer_info(reader) is not None:
                    return reader.name
                frontier.append(reader)
    return None
