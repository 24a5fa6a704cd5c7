"""The block morph: a new transformer block after block L that starts as the identity (LLaMA Pro)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import blocks as mblocks
from onnxmorph.contract.passinfra import SEED, MorphPass, Param, PassResult
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import build
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import LayerInfo
from onnxmorph.numerics.dtypes import is_float

log = logging.getLogger("onnxmorph")

INITS = ("copy", "random", "zero")
# Ops whose output is 0 where their data input (input 0) is 0: layout, slicing, sums over axes, odd activations.
_CARRY_ZERO = ("Reshape", "Transpose", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Cast", "Flatten", "Slice",
               "Expand", "Tile", "Split", "ReduceSum", "ReduceMean", "Neg", "Relu", "Gather", "DepthToSpace",
               "SpaceToDepth", "GatherElements", "GatherND", "Pad")
_ALL_ZERO = ("Add", "Sub", "Sum", "Concat", "Where")  # 0 where every summand (every part) is 0
_ANY_ZERO = ("Mul", "MatMul", "Einsum")  # 0 where one factor is 0
_FALLBACK = 1000  # the cost of zeroing a constant factor rather than the projection before it


def block_ref(value: Any) -> str:
    """A block's index (0, "0"), output tensor or module path, as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value in ("", None):
        raise UsageError(f"expected a block index or name, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise UsageError(f"expected a block index from 0, got {value}")
    return str(value)


@dataclass(frozen=True)
class Writer:
    """What starts at zero so that one sublayer adds exactly 0 to the stream.

    `layers`: projections whose weight (and constant bias) become 0; `constants`: (node, input) constants that
    become 0 (a bias Add, the gain and shift of a norm that ends the branch, an expert weight that is gathered).
    """

    layers: tuple[str, ...]
    constants: tuple[tuple[str, int], ...]

    @property
    def names(self) -> list[str]:
        return [*self.layers, *(f"{node}[{k}]" for node, k in self.constants)]


def find_block(model: mgraph.ModelOrAnalysis, ref: str, graph: gs.Graph | None = None,
               shapes: mblocks.Shapes | None = None) -> mblocks.Block:
    """The block named by `ref`: its index, output tensor, last residual Add or module path, or whatever names a
    node inside it as `inspect` prints it (a node or output name, a module path such as `model.layers.3.mlp`).

    In `graph` (a graph being edited, with the model's `shapes`) when given, else in the model's analysis view.
    """
    found = mblocks.model_blocks(model) if graph is None else \
        mblocks.blocks(graph, mgraph.node_modules(mgraph.model_of(model)), shapes)
    if not found:
        raise NotApplicable("no transformer blocks found: no chain of residual Adds (x + f(x), f holding a "
                            "MatMul/Gemm/Conv layer) on a stream")
    for block in found:
        names = {str(block.index), block.output.name, block.sublayers[-1].add.name, block.module}
        if ref in names:
            return block
    listed = ", ".join(f"{b.index} ({b.module or b.output.name})" for b in found[:8])
    listed += f", ... ({len(found)} in all)" if len(found) > 8 else ""
    view = graph if graph is not None else mgraph.read_view(model)
    try:
        node = mgraph.find_node(view, ref) if not ref.isdigit() else None
    except UsageError:
        node = None
    if node is not None:
        for block in found:
            if any(n.name == node.name for n in block.nodes):
                return block
        raise UsageError(f"'{ref}' ({node.op} '{node.name}') is in no transformer block (blocks: {listed})")
    names = [b.module or b.output.name for b in found] + list(mgraph.module_paths(view).values())
    raise UsageError(f"no block '{ref}' (blocks: {listed}); {mgraph.suggest(ref, names)}")


class _Refusal(Exception):
    def __init__(self, node: gs.Node) -> None:
        super().__init__(node.name)
        self.node = node


def _normalized(tensor: gs.Tensor) -> bool:
    """Whether `tensor` is a norm's output before its gain: x times (or over) a statistic of x."""
    node = mgraph.producer(tensor)
    while node is not None and node.op in ("Cast", "Identity"):
        node = mgraph.producer(node.inputs[0])
    return node is not None and mblocks.norm_at(node.outputs[0]) is not None and node.op in ("Mul", "Div") and not any(
        isinstance(t, gs.Constant) for t in node.inputs)


def _zero(tensor: gs.Tensor, members: set[int], memo: dict[str, Any]) -> tuple[int, list[str], list[tuple[str, int]]]:
    """(cost, layers, constants) that make `tensor` exactly 0 whatever the block's input; `_Refusal` naming the
    node that cannot be zeroed. Where several choices exist (a product), the nearest one (fewest ops) wins."""
    if tensor.name in memo:
        found = memo[tensor.name]
        if isinstance(found, _Refusal):
            raise found
        return found
    node = mgraph.producer(tensor)
    try:
        if node is None or id(node) not in members:
            raise _Refusal(node) if node is not None else _Refusal(gs.Node("Input", tensor.name))
        result = _zero_node(node, tensor, members, memo)
    except _Refusal as refusal:
        memo[tensor.name] = refusal
        raise
    memo[tensor.name] = result
    return result


def _zero_node(node: gs.Node, tensor: gs.Tensor, members: set[int], memo: dict[str, Any]
               ) -> tuple[int, list[str], list[tuple[str, int]]]:
    if mgraph.layer_info(node) is not None:
        return 1, [node.name], []
    constant = [k for k, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
    computed = [k for k, t in enumerate(node.inputs) if t.name and not isinstance(t, gs.Constant)]
    if node.op in mblocks.FUSED_NORMS[:3]:
        # a norm ending the branch: gain and shift 0 make its output 0 whatever its input (see BlockPass)
        params = [k for k in (1, 2) if len(node.inputs) > k and node.inputs[k].name]
        if any(k not in constant for k in params):
            raise _Refusal(node)
        return 1, [], [(node.name, k) for k in params]
    if node.op in _ALL_ZERO:
        parts = [k for k in range(len(node.inputs)) if node.inputs[k].name and (node.op != "Where" or k > 0)]
        cost, layers, constants = 1, [], []
        for k in parts:
            if k in constant:
                constants.append((node.name, k))
                continue
            c, lay, con = _zero(node.inputs[k], members, memo)
            cost, layers, constants = cost + c, layers + lay, constants + con
        return cost, layers, constants
    if node.op in _ANY_ZERO:
        if len(computed) == 1 and constant and (node.op != "Mul" or _normalized(node.inputs[computed[0]])):
            return 1, [], [(node.name, constant[0])]  # a norm's gain (the decomposed form)
        options, refusal = [], None
        for k in computed:
            try:
                options.append(_zero(node.inputs[k], members, memo))
            except _Refusal as error:
                refusal = refusal or error
        if node.op == "Mul" and constant:  # a constant factor (a layer scale): when no projection can start at zero
            options.append((_FALLBACK, [], [(node.name, constant[0])]))
        if not options:
            raise refusal or _Refusal(node)
        cost, layers, constants = min(options, key=lambda o: o[0])
        return cost + 1, layers, constants
    if node.op == "Div" and computed and computed[0] == 0:
        cost, layers, constants = _zero(node.inputs[0], members, memo)
        return cost + 1, layers, constants
    if node.op in _CARRY_ZERO and node.inputs:
        if node.op == "Pad" and len(node.inputs) > 2 and node.inputs[2].name and (
                not isinstance(node.inputs[2], gs.Constant) or np.any(mgraph.values(node.inputs[2]))):
            raise _Refusal(node)
        if isinstance(node.inputs[0], gs.Constant):
            if node.op not in ("Gather", "GatherElements", "GatherND"):
                raise _Refusal(node)
            return 1, [], [(node.name, 0)]  # weights gathered per token (an MoE's experts)
        cost, layers, constants = _zero(node.inputs[0], members, memo)
        return cost + 1, layers, constants
    raise _Refusal(node)


def _writer(block: mblocks.Block, sub: mblocks.Sublayer) -> Writer:
    members = {id(n) for n in block.nodes}
    try:
        _cost, layers, constants = _zero(sub.branch, members, {})
    except _Refusal as refusal:
        node = refusal.node
        if node.op == "Input" or id(node) not in members:
            raise NotApplicable(f"block {block.index}: the branch into residual Add '{sub.add.name}' has no "
                                "projection to start at zero") from None
        raise NotApplicable(
            f"block {block.index}: the branch into residual Add '{sub.add.name}' ends in {node.op} "
            f"'{node.name}', which does not give 0 for a 0 input; no projection, bias or norm gain before it can "
            "start at zero") from None
    return Writer(tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(constants)))


def plan(model: mgraph.ModelOrAnalysis, ref: str, graph: gs.Graph | None = None
         ) -> tuple[mblocks.Block, list[Writer]]:
    """The block after which to insert and the writers of its copy; NotApplicable with the reason otherwise."""
    shapes = mgraph.tensor_shapes(model) if graph is not None else None
    block = find_block(mgraph.model_of(model), ref, graph, shapes) if graph is not None else find_block(model, ref)
    name = f"block {block.index}" + (f" ({block.module})" if block.module else "")
    if block.kind == "post-norm":
        raise NotApplicable(
            f"{name} is post-norm (a {' and a '.join(sorted(set(block.norms)))} after its residual Adds): a copy "
            "whose writers are zero computes norm(x), not x, so no new block after it starts as the identity"
        )
    nested = [n.name for n in block.nodes if any(isinstance(v, gs.Graph) for v in n.attrs.values())]
    if nested:
        raise NotApplicable(f"{name}: node '{nested[0]}' holds a subgraph; blocks with control flow are not copied")
    shapes = shapes if shapes is not None else mgraph.tensor_shapes(model)
    before, after = shapes.get(block.input.name), shapes.get(block.output.name)
    if before is not None and after is not None and not mblocks.same_layout(before, after):
        raise NotApplicable(f"{name}: the stream enters as {list(before)} and leaves as {list(after)}; a copy of the "
                            "block cannot read what it writes")
    return block, [_writer(block, sub) for sub in block.sublayers]


class _Copier:
    """Replicates a block's nodes onto a new stream, with fresh copies of its float weights."""

    def __init__(self, graph: gs.Graph, namer: mgraph.Namer, scope: str) -> None:
        self.graph, self.namer, self.scope = graph, namer, scope
        self.tensors: dict[str, gs.Tensor] = {}
        self.nodes: dict[str, gs.Node] = {}

    def _name(self, name: str) -> str:
        return self.namer(self.scope, name.strip("/") or "node")

    def _input(self, tensor: gs.Tensor) -> gs.Tensor:
        if tensor.name in self.tensors:
            return self.tensors[tensor.name]
        if isinstance(tensor, gs.Constant) and tensor.dtype is not None and is_float(tensor.dtype) \
                and int(np.prod(tensor.shape)) > 1:
            # The new block's weights are its own (a shared one would tie it to its source in training).
            copy = mgraph.constant(self._name(tensor.name), mgraph.values(tensor), mgraph.values(tensor).dtype)
            self.tensors[tensor.name] = copy
            return copy
        return tensor  # outer activations (masks, rotary tables, shapes) and small constants are shared

    def copy(self, block: mblocks.Block, source: gs.Tensor) -> gs.Tensor:
        self.tensors[block.input.name] = source
        for node in block.nodes:
            inputs = [self._input(t) for t in node.inputs]
            outputs = []
            for out in node.outputs:
                new = gs.Variable(self._name(out.name), dtype=out.dtype, shape=out.shape)
                self.tensors[out.name] = new
                outputs.append(new)
            copy = gs.Node(node.op, self._name(node.name or node.op), attrs=dict(node.attrs), inputs=inputs,
                           outputs=outputs, domain=node.domain)
            self.graph.nodes.append(copy)
            self.nodes[node.name] = copy
        return self.tensors[block.output.name]


def _set_zero(copier: _Copier, node: gs.Node, k: int) -> None:
    tensor = node.inputs[k]
    # a constant the copy shares with its source (a scalar) gets a new name: the source keeps its own
    own = any(copy is tensor for copy in copier.tensors.values())
    mgraph.set_input_constant(node, k, np.zeros(tensor.shape, mgraph.dtype_of(tensor)),
                              None if own else copier._name(tensor.name))


def _initialise(copier: _Copier, block: mblocks.Block, writers: list[Writer], init: str,
                rng: np.random.Generator) -> None:
    """Writers (and their biases) to zero; with `init` random or zero, the other layers' weights too."""
    written = {name for w in writers for name in w.layers}
    for node in block.nodes:
        info = mgraph.layer_info(node)
        if info is None:
            continue
        new = copier.nodes[node.name]
        k = mgraph.weight_index(node)
        if node.name in written or init == "zero":
            _set_zero(copier, new, k)
            if len(new.inputs) > 2 and isinstance(new.inputs[2], gs.Constant):
                _set_zero(copier, new, 2)
        elif init == "random":
            w = mgraph.values(new.inputs[k])
            mgraph.set_input_constant(new, k, rng.normal(0.0, float(w.std()) or 0.02, w.shape).astype(w.dtype))
    for w in writers:
        for name, k in w.constants:
            _set_zero(copier, copier.nodes[name], k)


@register
class BlockPass(MorphPass):
    """Insert a new transformer block after block L that computes the identity at first.

    The new block is a copy of block L (its norms, attention and feed-forward, with their own
    weights) whose writers, the attention output projection and the feed-forward down projection
    (with their biases), are zero: each sublayer adds exactly 0 to the residual stream, so the
    block passes its input through unchanged (the LLaMA Pro construction).

    What starts at zero is read from the graph, walking back from each residual Add through ops
    that give 0 for a 0 input: a parallel block (attention and MLP summed before one Add, GPT-NeoX,
    Phi, Falcon, an MoE's shared expert) zeroes every branch's final projection; a product (an
    expert's output times its routing weight) needs one factor at zero, the nearest; gathered
    expert weights are zeroed where they are stored.

    A norm after the sublayer, before the Add (`x + Norm(W f(x))`: Gemma 2/3, OLMo 2), gets its gain
    and shift zeroed, not W: `Norm(0)` is `beta` for a LayerNorm (0 only without a shift) and
    `0 * gamma / sqrt(eps)` for an RMSNorm, exact but with a gradient 1/sqrt(eps) (about 1000x) on W at
    the start, whereas gain 0 gives exactly 0 whatever W computes (the normalised values are finite,
    eps > 0), keeps W's copied weights, and trains from a gradient of the size of the normalised
    activations (zero-initialised residual gains, as in ReZero and zero-gamma ResNets).

    Post-norm blocks (BERT's) are refused: their norm after the residual Add would not be the
    identity.
    """

    name = "block"
    summary = "insert a new pre-norm transformer block after block L, the identity through the residual"
    params = (
        Param("after", block_ref, "the block after which the new one goes: its index, output tensor or module "
              "path (inspect lists them)", metavar="L"),
        Param("init", str, "what the new block's other weights start as: a copy of block L's, random with "
              "their scale, or zero (the writers are zero in every case)", default="copy", choices=INITS),
        SEED,
    )

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        """The block that holds `layer`, for `inspect` (None outside blocks)."""
        for block in mblocks.model_blocks(model):
            if any(n.name == layer.name for n in block.nodes):
                return cls(after=block.index)
        return None

    def requires(self, model: mgraph.ModelOrAnalysis) -> tuple[mblocks.Block, list[Writer]]:
        return plan(mgraph.analysis(model), str(self.after))

    def describe(self, plan: tuple[mblocks.Block, list[Writer]]) -> dict[str, Any]:
        return {"after": plan[0].index}

    def call(self, model: mgraph.ModelOrAnalysis, planned: tuple[mblocks.Block, list[Writer]]) -> PassResult:
        graph = mgraph.import_graph(mgraph.model_of(model))
        # the plan was made on the read view; the same block is found again in the editable graph
        block, writers = plan(model, str(planned[0].index), graph)
        model = mgraph.model_of(model)
        namer = mgraph.Namer(graph)
        scope = build.fresh_scope(namer, f"{block.module or 'block_' + str(block.index)}/morph_block")
        readers = list(block.output.outputs)
        copier = _Copier(graph, namer, scope)
        new_output = copier.copy(block, block.output)
        _initialise(copier, block, writers, self.init, np.random.default_rng(self.seed))
        renamed = namer(block.output.name, "morph_block", "before") if mgraph.is_graph_output(graph, block.output) \
            else None
        mgraph.replace_all_uses(graph, block.output, new_output, readers, renamed=renamed)
        log.info("block: %d nodes copied from block %d, writers %s start at zero", len(copier.nodes),
                 block.index, ", ".join(n for w in writers for n in w.names))
        return PassResult(mgraph.export_model(graph, like=model), True)
