"""Transformer structure found on the graph, whatever exported it: residual sublayers, blocks, norms, module paths.

A *sublayer* is a residual `Add(x, f(x))` whose branch f contains a layer (MatMul/Gemm/Conv with
a constant weight); `x` is the stream. Sublayers chain along the stream: in a pre-norm model the
next sublayer's stream is this Add's output, in a post-norm one it is a norm of it; between them
the stream may pass *links* that change its layout but not its values (a Cast, or a Reshape that
keeps the last axis, as OPT's feed-forward works on [B*T, H]). A sublayer holds *attention* when
its branch has a Softmax between two products of computed tensors (scores = Q K^T before it,
probabilities times V after it); a Softmax over a projection's outputs (an MoE router's, over the
experts) is not attention. A *block* starts at each sublayer that holds attention and takes the
sublayers after it up to the next one (a parallel block, attention and MLP summed into one Add,
is one sublayer). A sublayer is pre-norm when every path from its stream into the branch is
normalised (a fused LayerNormalization/SimplifiedLayerNormalization/RMSNormalization, or the
decomposed form: statistics by ReduceMean, then a Mul or Div by them) before reaching a layer;
its branch may also end in a norm (Gemma 2's and OLMo 2's norm after the sublayer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxmorph.graph.core import (
    LAYER_OPS,
    Analysis,
    ModelOrAnalysis,
    layer_info,
    node_modules,
    producer,
    read_view,
    tensor_shapes,
)

FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
               "SkipSimplifiedLayerNormalization")
_STATISTICS = ("ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum")
_BLIND = ("Shape", "Size")  # read only the stream's dims, not its values
_CASTS = ("Cast", "Identity")  # what exporters put on the stream between sublayers (a float32 -> float32 Cast)
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
# Ops on the way from the attention scores to the Softmax and from it to the values product: scaling, masks,
# soft-capping (cap * tanh(s / cap)), casts, and the reshapes some exporters put around the mask.
_SCORE_PATH = ("Add", "Mul", "Div", "Where", "Cast", "Softmax", "IsNaN", "Dropout", "Identity", "Sub", "Tanh", "Clip",
               "Reshape", "Transpose", "Min", "Max")
Shapes = Mapping[str, "tuple[int | None, ...] | None"]


@dataclass
class Sublayer:
    """One residual Add of the stream and the nodes of its branch (in graph order)."""

    add: gs.Node
    stream: gs.Tensor
    branch: gs.Tensor
    nodes: list[gs.Node]
    norm: str | None  # what normalises the stream first (pre-norm), or None
    attention: bool
    end_norm: str | None = None  # the norm the branch ends in (a norm after the sublayer, before the Add), or None

    @property
    def output(self) -> gs.Tensor:
        return self.add.outputs[0]


@dataclass
class Block:
    """Consecutive sublayers from one attention sublayer to the next, and how they are normalised."""

    index: int
    sublayers: list[Sublayer]
    kind: str  # "pre-norm", "post-norm" (a norm after the residual Add), "sublayer-norm" (a norm ending each
    # branch, none before it) or "no-norm"
    output: gs.Tensor  # the stream after the block (after the norm for post-norm, after the links that follow)
    norms: list[str] = field(default_factory=list)
    module: str | None = None

    input: gs.Tensor | None = None  # the stream before the block (before any link on the way)
    nodes: list[gs.Node] = field(default_factory=list)  # every node of the block, in graph order
    parallel: bool = False  # attention and other layers side by side in one sublayer (GPT-J/NeoX, Phi, Falcon)
    experts: int | None = None  # a mixture of experts: the router's choices (its projection's width) ...
    top_k: int | None = None  # ... and how many each token takes


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


def _decomposed(nodes: list[gs.Node], node: gs.Node) -> str:
    return "LayerNorm (decomposed)" if any(o.op == "Sub" for o in nodes[:nodes.index(node)]) else "RMSNorm (decomposed)"


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
            found = found or _decomposed(nodes, node)
            continue
        if node.op in LAYER_OPS or node.op == "Softmax":
            return None
        outs = {t.name for t in node.outputs}
        reached |= outs
        if node.op in _STATISTICS or any(n in statistics for n in names):
            statistics |= outs
    return found


def _constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _computed(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not _constant(t) and t.name]


def _statistic(tensor: gs.Tensor, depth: int = 6) -> bool:
    """Whether `tensor` is computed from a statistic over an axis (ReduceMean ...), through the scalar arithmetic
    of a norm's denominator (Add eps, Sqrt, Reciprocal, Pow, Cast)."""
    node = producer(tensor)
    while node is not None and depth > 0:
        if node.op in _STATISTICS:
            return True
        if node.op not in ("Add", "Sqrt", "Reciprocal", "Pow", "Cast", "Div", "Max", "Identity"):
            return False
        computed = _computed(node)
        if len(computed) != 1:
            return False
        node, depth = producer(computed[0]), depth - 1
    return False


def norm_at(tensor: gs.Tensor) -> str | None:
    """The norm whose output `tensor` is (after its gain and shift), or None: a fused norm, or the decomposed
    form, x times (or over) a statistic of x, then a constant gain and shift, casts on the way."""
    node = producer(tensor)
    while node is not None:
        if node.op in FUSED_NORMS:
            return node.op
        computed = _computed(node)
        if node.op in _CASTS and computed:
            node = producer(computed[0])
        elif node.op in ("Mul", "Add") and len(computed) == 1:  # gain, shift
            node = producer(computed[0])
        elif node.op in ("Mul", "Div") and len(computed) == 2 and _statistic(node.inputs[1]):
            ancestors = []
            walk = producer(node.inputs[0])
            for _ in range(3):  # LayerNorm: x - mean(x) before the division
                if walk is None:
                    break
                ancestors.append(walk.op)
                walk = producer(walk.inputs[0]) if walk.inputs else None
            return "LayerNorm (decomposed)" if "Sub" in ancestors else "RMSNorm (decomposed)"
        else:
            return None
    return None


def attention_core(nodes: list[gs.Node]) -> tuple[gs.Node, gs.Node, gs.Node] | None:
    """(Softmax, scores MatMul, probabilities-times-values MatMul) of the first attention in `nodes`, or None.

    Attention is a Softmax whose input comes from a MatMul of two computed tensors (Q K^T) and whose output
    reaches one (times V), through the ops of `_SCORE_PATH` only. A router's Softmax over a projection's outputs
    (mixture of experts) or over constants is not attention.
    """
    members = {id(n) for n in nodes}
    for softmax in (n for n in nodes if n.op == "Softmax"):
        scores = _nearest_product(softmax, members, lambda node: [p for p in map(producer, _computed(node)) if p])
        values = _nearest_product(softmax, members, lambda node: list(node.outputs[0].outputs))
        if scores is not None and values is not None:
            return softmax, scores, values
    return None


def _nearest_product(start: gs.Node, members: set[int], neighbours: Callable[[gs.Node], list[gs.Node]]
                     ) -> gs.Node | None:
    """The first MatMul of two computed tensors reached from `start` through score-path ops, inside the branch."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        for near in neighbours(node):
            if id(near) not in members or id(near) in seen:
                continue
            seen.add(id(near))
            if near.op in ("MatMul", "Einsum") and len(_computed(near)) == 2:
                return near
            if near.op in _SCORE_PATH:
                stack.append(near)
    return None


def _reach(starts: Iterable[gs.Node], members: set[int], forward: bool) -> set[int]:
    """The nodes of `members` reached from `starts` (themselves included) following outputs or inputs."""
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) not in members:
            continue
        seen.add(id(node))
        if forward:
            stack += [r for t in node.outputs for r in t.outputs]
        else:
            stack += [p for p in map(producer, node.inputs) if p is not None]
    return seen


def is_parallel(sub: Sublayer) -> bool:
    """Whether `sub` holds attention and, beside it, a layer that neither feeds it nor reads it (an MLP that reads the
    same stream and is summed with the attention before the residual Add)."""
    core = attention_core(sub.nodes) if sub.attention else None
    if core is None:
        return False
    members = {id(n) for n in sub.nodes}
    around = _reach([core[1], core[2]], members, False) | _reach([core[2]], members, True)
    return any(layer_info(n) is not None and id(n) not in around for n in sub.nodes)


def router(nodes: list[gs.Node]) -> tuple[int, int | None] | None:
    """(experts, top_k) of a mixture-of-experts router among `nodes`: a TopK over the outputs of a projection (through
    a Softmax or Sigmoid, casts): the projection's width is the number of experts, TopK's k the experts per token."""
    for topk in (n for n in nodes if n.op == "TopK"):
        node = producer(topk.inputs[0])
        while node is not None and node.op in ("Softmax", "Sigmoid", "Cast", "Identity", "LogSoftmax"):
            node = producer(node.inputs[0])
        info = layer_info(node) if node is not None else None
        if info is None:
            continue
        transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        experts = info.weight_shape[0] if transposed else info.weight_shape[-1]
        k = topk.inputs[1] if len(topk.inputs) > 1 else None
        top = int(k.values.reshape(-1)[0]) if isinstance(k, gs.Constant) and k.values.size == 1 else topk.attrs.get("k")
        return int(experts), (int(top) if top is not None else None)
    return None


def sublayers(graph: gs.Graph) -> list[Sublayer]:
    """Every residual sublayer of `graph`, in graph order."""
    order = _index(graph)
    found = []
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(_constant(t) for t in add.inputs):
            continue
        for stream, branch in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            nodes = _branch_nodes(stream, branch, order)
            if nodes and any(layer_info(n) is not None for n in nodes):
                found.append(Sublayer(add, stream, branch, nodes, _first_norm(stream, nodes),
                                      attention_core(nodes) is not None, norm_at(branch)))
                break
    return found


def _shape(tensor: gs.Tensor, shapes: Shapes) -> tuple[int | None, ...] | None:
    shape = shapes.get(tensor.name)
    if shape is None and tensor.shape is not None:
        shape = tuple(d if isinstance(d, int) else None for d in tensor.shape)
    return shape


def same_layout(one: tuple[int | None, ...] | None, other: tuple[int | None, ...] | None) -> bool:
    """Whether two shapes are known to have the same rank and disagree on no size known in both."""
    return one is not None and other is not None and len(one) == len(other) and all(
        a is None or b is None or a == b for a, b in zip(one, other))


def _is_link(node: gs.Node, shapes: Shapes) -> bool:
    """A node that carries the stream on unchanged in value: a Cast, or a reshape keeping the last (hidden) axis."""
    if not node.inputs or _constant(node.inputs[0]) or len(node.outputs) != 1:
        return False
    if node.op in _CASTS:
        return len(node.inputs) == 1
    if node.op not in _RESHAPES:
        return False
    before, after = _shape(node.inputs[0], shapes), _shape(node.outputs[0], shapes)
    return bool(before and after and before[-1] is not None and before[-1] == after[-1])


def _links_before(tensor: gs.Tensor, shapes: Shapes) -> list[gs.Node]:
    """The link nodes that lead to `tensor` from the stream before them, first first."""
    links = []
    node = producer(tensor)
    while node is not None and _is_link(node, shapes):
        links.append(node)
        node = producer(node.inputs[0])
    return links[::-1]


def _links_after(tensor: gs.Tensor, shapes: Shapes) -> list[gs.Node]:
    """The link nodes that carry `tensor` on while each is the only reader of what it reads (Shape aside)."""
    links = []
    while True:
        readers = [n for n in tensor.outputs if n.op not in _BLIND]
        if len(readers) != 1 or not _is_link(readers[0], shapes):
            return links
        links.append(readers[0])
        tensor = readers[0].outputs[0]


def _origin(tensor: gs.Tensor, shapes: Shapes) -> gs.Tensor:
    links = _links_before(tensor, shapes)
    return links[0].inputs[0] if links else tensor


def _norm_after(tensor: gs.Tensor) -> gs.Node | None:
    """The fused norm that is the only reader of `tensor` (post-norm), if any."""
    readers = [n for n in tensor.outputs if n.op not in _BLIND]
    return readers[0] if len(readers) == 1 and readers[0].op in FUSED_NORMS else None


def _chains(found: list[Sublayer], shapes: Shapes) -> list[list[Sublayer]]:
    by_stream = {_origin(s.stream, shapes).name: s for s in found}
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


def _norm_names(s: Sublayer) -> str:
    before = s.norm or getattr(_norm_after(s.output), "op", None)
    if s.end_norm is None:
        return before or "no norm"
    if before == s.end_norm:
        return f"{before} before and after"
    return f"{before} before, {s.end_norm} after" if before else f"{s.end_norm} after"


def blocks(graph: gs.Graph, modules: dict[str, str] | None = None, shapes: Shapes | None = None) -> list[Block]:
    """The blocks of `graph`'s residual streams, numbered from 0 in graph order.

    `shapes` (inferred shapes by tensor name) tell which reshapes on the stream keep its hidden axis; without
    them the shapes recorded on the graph's tensors are used.
    """
    shapes = shapes or {}
    order = _index(graph)
    result: list[Block] = []
    for chain in _chains(sublayers(graph), shapes):
        groups: list[list[Sublayer]] = []
        use_attention = any(s.attention for s in chain)
        for s in chain:
            if use_attention and not groups and not s.attention:
                continue  # before the first attention: an embedding's residual (wav2vec2's positional conv)
            if not groups or (s.attention if use_attention else True):
                groups.append([s])
            else:
                groups[-1].append(s)
        leading = [_links_before(group[0].stream, shapes) for group in groups]
        for k, group in enumerate(groups):
            pre = all(s.norm is not None for s in group)
            post = _norm_after(group[-1].output)
            ends = all(s.end_norm is not None for s in group)
            kind = ("post-norm" if post is not None and not pre else "pre-norm" if pre
                    else "sublayer-norm" if ends else "no-norm")
            output = group[-1].output if kind != "post-norm" else post.outputs[0]
            # The links after the block (on the way to the next block's stream, or to what reads the last one) are
            # the block's: its copy then takes and gives the stream in one layout.
            start = leading[k][0].inputs[0] if leading[k] else group[0].stream
            after = _links_after(output, shapes)
            if k + 1 < len(groups):
                after = [n for n in after if any(n is m for m in leading[k + 1])]
            # as far as the stream has the layout it came in with (OPT's [B*T, H] back to [B, T, H]), no further (a
            # Swin stage's last block is followed by the patch merging's [B, H, W, C])
            want = _shape(start, shapes)
            ends = [i for i in range(len(after) + 1) if same_layout(want, _shape(
                after[i - 1].outputs[0] if i else output, shapes))]
            after = after[:ends[0]] if ends else []
            if k + 1 < len(groups):
                leading[k + 1] = [m for m in leading[k + 1] if not any(n is m for n in after)]
            output = after[-1].outputs[0] if after else output
            links = [n for s in group[1:] for n in _links_before(s.stream, shapes)]
            members = {id(n): n for n in (*leading[k], *links, *after)}
            for s in group:
                members.update({id(n): n for n in (*s.nodes, s.add)})
            if kind == "post-norm":
                members[id(post)] = post
            nodes = sorted(members.values(), key=lambda n: order[id(n)])
            # The layers and residual Adds name the module; the branch may hold helpers from elsewhere.
            named = [n.name for n in nodes if layer_info(n) is not None] + [s.add.name for s in group]
            routed = next((r for r in (router(s.nodes) for s in group) if r is not None), None)
            result.append(Block(len(result), group, kind, output, [_norm_names(s) for s in group],
                                common_module(named, modules or {}), start, nodes,
                                any(is_parallel(s) for s in group), *(routed or (None, None))))
    return result


def model_blocks(model: ModelOrAnalysis) -> list[Block]:
    """The blocks of `model`'s analysis view with its module paths (found once per `graph.Analysis`).

    `inspect` asks once per layer: an Analysis keeps the answer for the model it describes.
    """
    if isinstance(model, Analysis):
        return model.memo("blocks", None, lambda: blocks(model.view, node_modules(model.model), model.shapes))
    return blocks(read_view(model), node_modules(model), tensor_shapes(model))


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
    if prefix and any(len(p) > len(prefix) and p[len(prefix)].isdigit() for p in paths):
        prefix = prefix[:-1]  # the names differ by an index into a list (T5's block.0.layer.0, layer.1): not a module
    return ".".join(prefix) or None
