"""Rewriting after a channel analysis: per-channel constants grown once or copied, shape constants and Splits resized.

Shared by every pass that adds channels (widen, the concat skip) so the bookkeeping lives once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis.coupling import Consumer, Coupling, GroupChange, Param, ints
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import widening as wsolve

# What a new channel's per-channel constant starts as, by the role the analysis gave it: the value
# that makes the op the identity on it (a norm's scale 1 and shift 0, a variance 1) or 0. A PRelu
# slope ("slope") takes the mean of the old slopes instead, when it is at most 1 in size.
NEUTRAL = {"scale": 1.0, "norm-scale": 1.0, "shift": 0.0, "var": 1.0, "copy-only": 0.0, "bias": 0.0}


def extendable(param: Param) -> bool:
    """Whether `extend_param` knows what `param`'s new entries start as."""
    return param.role in NEUTRAL or param.role in ("slope", "filter")


def extend_param(param: Param, array: np.ndarray, coupling: Coupling, rng: np.random.Generator, *,
                 sources: np.ndarray | None = None) -> np.ndarray:
    """`array` (a per-channel constant of the coupling) with its new channels.

    A depthwise layer on the way ("filter") gets new filters, copies of `sources` or random; the
    other roles get their neutral value, or the entries of `sources` when channels are copied.
    """
    space = coupling.spaces[param.space]
    if param.role == "filter":
        return wsolve.solve_widen_incoming(array, param.axis, space.inserts, rng,
                                           mode="random" if sources is None else "copy", sources=sources,
                                           offset=param.offset, block=param.block)
    value = new_slope(array) if param.role == "slope" else NEUTRAL[param.role]
    return wsolve.fill_channels(array, param.axis, space.inserts, value, sources=sources, offset=param.offset,
                                block=param.block, old=space.old)


def new_slope(slopes: np.ndarray) -> float:
    """The old slopes' mean (float64: float32 slopes near its limit sum to inf), or 1 when that is not in [-1, 1].

    A new channel's values may be anything (random filters, the skip's A); a slope above 1 could
    overflow them to inf, and inf times the consumers' zero weights is NaN, not 0.
    """
    mean = float(np.mean(slopes, dtype=np.float64)) if slopes.size else 1.0
    return mean if abs(mean) <= 1.0 else 1.0


def grow_groups(node: gs.Node, change: GroupChange, rng: np.random.Generator, zero_first: int = 0) -> None:
    """More groups for a depthwise or grouped Conv; a grouped one gets the new groups' filters (random,
    the first `zero_first` exactly 0) and zero bias."""
    node.attrs["group"] = int(node.attrs.get("group", 1)) + change.added_groups
    if change.derived is None:
        return
    w = mgraph.values(node.inputs[1])
    mgraph.set_input_constant(node, 1, wsolve.solve_widen_incoming(
        w, 0, change.new_filters, rng, mode="random", zero_first=zero_first))
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        mgraph.set_input_constant(node, 2, wsolve.fill_channels(
            mgraph.values(node.inputs[2]), 0, change.new_filters, 0.0))


def grow_coupling(graph: gs.Graph, coupling: Coupling, extend: Callable[[Param, np.ndarray], np.ndarray],
                  outgoing: Callable[[gs.Node, np.ndarray, Consumer], np.ndarray], rng: np.random.Generator,
                  guards: dict[int, int] | None = None) -> None:
    """Everything a coupling touches, after its producers: per-channel constants (`extend`), grouped
    convs on the way, the consumers' weights on the new channels (`outgoing`) and the shape constants."""
    nodes = {n.name: n for n in graph.nodes}
    grow_params(graph, coupling, extend)
    for change in coupling.groups:
        zero_first = (guards or {}).get(change.derived, 0) if change.derived is not None else 0
        grow_groups(nodes[change.node], change, rng, zero_first)
    grow_consumers(nodes, coupling, outgoing)
    apply_shape_fixes(graph, coupling)


def private_constant(graph: gs.Graph, node: gs.Node, index: int, array: np.ndarray,
                     namer: mgraph.Namer | None = None) -> gs.Constant:
    """Set input `index` of `node` to `array`; a constant other nodes also read gets a copy of its own."""
    old = node.inputs[index]
    others = [n for n in old.outputs if n is not node]
    name = None
    if others:
        name = (namer or mgraph.Namer(graph))(old.name, "widened")
    return mgraph.set_input_constant(node, index, array, name=name)


def grow_params(graph: gs.Graph, coupling: Coupling, extend: Callable[[Param, np.ndarray], np.ndarray]) -> None:
    """Grow every per-channel constant: `extend(param, array)` adds one slot's channels.

    A constant read by several nodes grows once when every reader needs the same growth (layer
    scale read twice, say); otherwise each widened reader gets a grown copy and the others keep it.
    """
    nodes = {n.name: n for n in graph.nodes}
    namer = mgraph.Namer(graph)
    by_input = coupling.params_by_input()
    by_constant: dict[str, list[tuple[str, int]]] = {}
    for name, index in by_input:
        by_constant.setdefault(nodes[name].inputs[index].name, []).append((name, index))
    for readers in by_constant.values():
        first = nodes[readers[0][0]].inputs[readers[0][1]]
        plans = {tuple((p.axis, p.offset, p.block, p.space, p.role) for p in by_input[r]) for r in readers}
        uses = {(n.name, k) for n in first.outputs for k, t in enumerate(n.inputs) if t is first}
        together = len(plans) == 1 and uses == set(readers)
        for k, (name, index) in enumerate(readers):
            node = nodes[name]
            if together and k:
                node.inputs[index] = nodes[readers[0][0]].inputs[readers[0][1]]
                continue
            array = mgraph.values(node.inputs[index])
            for param in by_input[(name, index)]:
                array = extend(param, array)
            if together:
                mgraph.set_input_constant(node, index, array)
            else:
                private_constant(graph, node, index, array, namer)


def apply_shape_fixes(graph: gs.Graph, coupling: Coupling) -> None:
    """After the channels grew: grow the constants that spell a shape, and forget stale shapes.

    Shared by every pass that adds channels (widen, concat-skip) so the bookkeeping lives once.
    """
    nodes = {node.name: node for node in graph.nodes}
    namer = mgraph.Namer(graph)
    copies: dict[tuple[str, str], gs.Node] = {}
    for fix in coupling.shape_fixes:
        node = nodes[fix.node]
        if fix.reader is not None:
            node = _private_node(graph, node, nodes[fix.reader], copies, namer)
        delta = coupling.added(fix.tensor, fix.axis) if fix.delta is None else fix.delta
        if fix.attr is not None:
            values = ints(node.attrs[fix.attr])
            values[fix.position] += delta
            node.attrs[fix.attr] = values
            continue
        shape = mgraph.values(node.inputs[fix.index]).copy()
        shape.reshape(-1)[fix.position] += delta
        private_constant(graph, node, fix.index, shape, namer)
    for split in coupling.split_fixes:
        node = nodes[split.node]
        node.attrs.pop("num_outputs", None)
        if graph.opset < 13:
            node.attrs["split"] = list(split.sizes)
        elif len(node.inputs) > 1 and node.inputs[1].name:
            private_constant(graph, node, 1, np.asarray(split.sizes, dtype=np.int64), namer)
        else:
            sizes = mgraph.constant(namer(node.name, "split"), np.asarray(split.sizes), np.int64)
            node.inputs = [node.inputs[0], sizes]
    tensors = graph.tensors()
    for name in coupling.tensors + coupling.stale:
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable):
            tensor.shape = None


def grow_consumers(nodes: dict[str, gs.Node], coupling: Coupling,
                   outgoing: Callable[[gs.Node, np.ndarray, Consumer], np.ndarray]) -> None:
    """Give every consumer layer its weights on the new channels: `outgoing(node, weight, consumer)`
    fills one slot at a time, the last offset first so that earlier offsets stay where they are."""
    by_consumer: dict[str, list[Consumer]] = {}
    for consumer in coupling.consumers:
        by_consumer.setdefault(consumer.node, []).append(consumer)
    for name, items in by_consumer.items():
        node = nodes[name]
        w = mgraph.values(node.inputs[1])
        for consumer in sorted(items, key=lambda q: q.offset, reverse=True):
            w = outgoing(node, w, consumer)
        mgraph.set_input_constant(node, 1, w)


def _private_node(graph: gs.Graph, node: gs.Node, reader: gs.Node, copies: dict[tuple[str, str], gs.Node],
                  namer: mgraph.Namer) -> gs.Node:
    """`node` (one output), or a copy of it that only `reader` reads when others read it too (a reshape target
    shared by layers that do not all grow)."""
    out = node.outputs[0]
    if all(n is reader for n in out.outputs):
        return node
    if (node.name, reader.name) not in copies:
        twin = gs.Variable(namer(out.name, "widened"), dtype=out.dtype, shape=out.shape)
        copy = gs.Node(node.op, namer(node.name, "widened"), dict(node.attrs), list(node.inputs), [twin])
        graph.nodes.append(copy)
        reader.inputs[[k for k, t in enumerate(reader.inputs) if t is out][0]] = twin
        copies[(node.name, reader.name)] = copy
    return copies[(node.name, reader.name)]
