"""Transformer structure found on the graph, whatever exported it: residual sublayers, blocks, norms, module paths.

A *sublayer* is a residual `Add(x, f(x))` whose branch f contains a layer (MatMul/Gemm/Conv with
a constant weight); `x` is the stream. Sublayers chain along the stream: in a pre-norm model the
next sublayer's stream is this Add's output, in a post-norm one it is a norm of it. A *block*
starts at each sublayer that holds attention (a Softmax) and takes the sublayers after it up to
the next one. A sublayer is pre-norm when every path from its stream into the branch is
normalised (a fused LayerNormalization/SimplifiedLayerNormalization/RMSNormalization, or the
decomposed form: statistics by ReduceMean, then a Mul or Div by them) before reaching a layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxmorph.graph.core import LAYER_OPS, Analysis, ModelOrAnalysis, layer_info, node_modules, producer, read_view

FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
               "SkipSimplifiedLayerNormalization")
_STATISTICS = ("ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum")
_BLIND = ("Shape", "Size")  # read only the stream's dims, not its values
_LINKS = ("Cast", "Identity")  # what exporters put on the stream between sublayers (a float32 -> float32 Cast)


@dataclass
class Sublayer:
    """One residual Add of the stream and the nodes of its branch (in graph order)."""

    add: gs.Node
    stream: gs.Tensor
    branch: gs.Tensor
    nodes: list[gs.Node]
    norm: str | None  # what normalises the stream first (pre-norm), or None
    attention: bool

    @property
    def output(self) -> gs.Tensor:
        return self.add.outputs[0]


@dataclass
class Block:
    """Consecutive sublayers from one attention sublayer to the next, and how they are normalised."""

    index: int
    sublayers: list[Sublayer]
    kind: str  # "pre-norm", "post-norm" (a norm after the residual Add), or "no-norm"
    output: gs.Tensor  # the stream after the block (after the norm for post-norm)
    norms: list[str] = field(default_factory=list)
    module: str | None = None

    input: gs.Tensor | None = None  # the stream before the block (before any Cast on the way)
    nodes: list[gs.Node] = field(default_factory=list)  # every node of the block, in graph order


def _index(graph: gs.Graph) -> dict[int, int]:
    return {id(n): k for k, n in enumerate(graph.nodes)}


def _branch_nodes(stream: gs.Tensor, branch: gs.Tensor, order: dict[int, int]) -> list[gs.Node] | None:
    """Nodes on a path from `stream` to `branch`, in graph order; None when `branch` does not depend on `stream`."""
    start = order[id(producer(stream))] if producer(stream) is not None else -1
    first = producer(branch)
    if first is None or order[id(first)] <= start:
        return None
    ancestors: dict[int, gs.Node] = {}
    stack = [first]
    while stack:
        node = stack.pop()
        if id(node) in ancestors:
            continue
        ancestors[id(node)] = node
        for tensor in node.inputs:
            parent = producer(tensor)
            if parent is not None and order[id(parent)] > start and id(parent) not in ancestors:
                stack.append(parent)
    reached = {stream.name}
    path = []
    for node in sorted(ancestors.values(), key=lambda n: order[id(n)]):
        if any(t.name in reached for t in node.inputs):
            path.append(node)
            reached.update(t.name for t in node.outputs)
    return path if path and path[-1] is first else None


def _first_norm(stream: gs.Tensor, nodes: list[gs.Node]) -> str | None:
    """What normalises `stream` on every path into a layer of `nodes`, or None when some path is not normalised."""
    reached, statistics, found = {stream.name}, set(), None
    for node in nodes:
        names = [t.name for t in node.inputs]
        if not any(n in reached for n in names) or node.op in _BLIND:
            continue
        if node.op in FUSED_NORMS:
            found = found or node.op
            continue
        if (node.op in ("Mul", "Div") and any(n in statistics for n in names)
                and any(n in reached and n not in statistics for n in names)):
            found = found or ("LayerNorm (decomposed)" if any(o.op == "Sub" for o in nodes[:nodes.index(node)])
                              else "RMSNorm (decomposed)")
            continue
        if node.op in LAYER_OPS or node.op == "Softmax":
            return None
        outs = {t.name for t in node.outputs}
        reached |= outs
        if node.op in _STATISTICS or any(n in statistics for n in names):
            statistics |= outs
    return found


def sublayers(graph: gs.Graph) -> list[Sublayer]:
    """Every residual sublayer of `graph`, in graph order."""
    order = _index(graph)
    found = []
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(isinstance(t, gs.Constant) for t in add.inputs):
            continue
        for stream, branch in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            nodes = _branch_nodes(stream, branch, order)
            if nodes and any(layer_info(n) is not None for n in nodes):
                found.append(Sublayer(add, stream, branch, nodes, _first_norm(stream, nodes),
                                      any(n.op == "Softmax" for n in nodes)))
                break
    return found


def _links_before(tensor: gs.Tensor) -> list[gs.Node]:
    """The Cast/Identity nodes that lead to `tensor` from the stream before them, first first."""
    links = []
    node = producer(tensor)
    while node is not None and node.op in _LINKS and len(node.inputs) == 1:
        links.append(node)
        node = producer(node.inputs[0])
    return links[::-1]


def _origin(tensor: gs.Tensor) -> gs.Tensor:
    links = _links_before(tensor)
    return links[0].inputs[0] if links else tensor


def _norm_after(tensor: gs.Tensor) -> gs.Node | None:
    """The fused norm that is the only reader of `tensor` (post-norm), if any."""
    readers = [n for n in tensor.outputs if n.op not in _BLIND]
    return readers[0] if len(readers) == 1 and readers[0].op in FUSED_NORMS else None


def _chains(found: list[Sublayer]) -> list[list[Sublayer]]:
    by_stream = {_origin(s.stream).name: s for s in found}
    following: dict[int, Sublayer] = {}
    for s in found:
        nxt = by_stream.get(s.output.name)
        post = _norm_after(s.output)
        if nxt is None and post is not None:
            nxt = by_stream.get(post.outputs[0].name)
        if nxt is not None:
            following[id(s)] = nxt
    targets = {id(s) for s in following.values()}
    chains = []
    for s in found:
        if id(s) in targets:
            continue
        chain = [s]
        while id(chain[-1]) in following:
            chain.append(following[id(chain[-1])])
        if len(chain) > 1:
            chains.append(chain)
    return chains


def blocks(graph: gs.Graph, modules: dict[str, str] | None = None) -> list[Block]:
    """The blocks of `graph`'s residual streams, numbered from 0 in graph order."""
    order = _index(graph)
    result: list[Block] = []
    for chain in _chains(sublayers(graph)):
        groups: list[list[Sublayer]] = []
        use_attention = any(s.attention for s in chain)
        for s in chain:
            if use_attention and not groups and not s.attention:
                continue  # before the first attention: an embedding's residual (wav2vec2's positional conv)
            if not groups or (s.attention if use_attention else True):
                groups.append([s])
            else:
                groups[-1].append(s)
        for group in groups:
            pre = all(s.norm is not None for s in group)
            post = _norm_after(group[-1].output)
            kind = "post-norm" if post is not None and not pre else "pre-norm" if pre else "no-norm"
            output = group[-1].output if kind != "post-norm" else post.outputs[0]
            norms = [s.norm or getattr(_norm_after(s.output), "op", "no norm") for s in group]
            members = {id(n): n for s in group for n in (*_links_before(s.stream), *s.nodes, s.add)}
            if kind == "post-norm":
                members[id(post)] = post
            nodes = sorted(members.values(), key=lambda n: order[id(n)])
            # The layers and residual Adds name the module; the branch may hold helpers from elsewhere.
            named = [n.name for n in nodes if layer_info(n) is not None] + [s.add.name for s in group]
            result.append(Block(len(result), group, kind, output, norms,
                                common_module(named, modules or {}), _origin(group[0].stream), nodes))
    return result


def model_blocks(model: ModelOrAnalysis) -> list[Block]:
    """The blocks of `model`'s analysis view with its module paths (found once per `graph.Analysis`).

    `inspect` asks once per layer: an Analysis keeps the answer for the model it describes.
    """
    if isinstance(model, Analysis):
        return model.memo("blocks", None, lambda: blocks(model.view, node_modules(model.model)))
    return blocks(read_view(model), node_modules(model))


# --------------------------------------------------------------------------- module paths


def common_module(names: Iterable[str], modules: dict[str, str]) -> str | None:
    """The deepest module that contains every one of `names` that has a module path."""
    paths = [modules[n].split(".") for n in names if n in modules]
    if not paths:
        return None
    prefix = paths[0]
    for path in paths[1:]:
        k = 0
        while k < min(len(prefix), len(path)) and prefix[k] == path[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix) or None
