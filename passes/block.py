"""The block morph: a new pre-norm transformer block after block L that starts as the identity (LLaMA Pro)."""

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
# Ops between a writer (the projection into the residual) and the residual Add that carry a zero through.
_ZERO_PRESERVING = ("Reshape", "Transpose", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Cast", "Flatten")


def block_ref(value: Any) -> str:
    """A block's index (0, "0"), output tensor or module path, as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value in ("", None):
        raise UsageError(f"expected a block index or name, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise UsageError(f"expected a block index from 0, got {value}")
    return str(value)


@dataclass(frozen=True)
class Writer:
    """The projection whose output reaches a residual Add, and the constant bias Adds on the way: (node, input)."""

    node: str
    biases: tuple[tuple[str, int], ...]


def find_block(model: onnx.ModelProto, ref: str, graph: gs.Graph | None = None) -> mblocks.Block:
    """The block named by `ref`: its index, its output tensor, its last residual Add or its module path.

    In `graph` (a graph being edited) when given, else in the model's analysis view.
    """
    found = mblocks.model_blocks(model) if graph is None else mblocks.blocks(graph, mblocks.node_modules(model))
    if not found:
        raise NotApplicable("no transformer blocks found: no chain of residual Adds (x + f(x), f holding a "
                            "MatMul/Gemm/Conv layer) on a stream")
    for block in found:
        names = {str(block.index), block.output.name, block.sublayers[-1].add.name, block.module}
        if ref in names:
            return block
    listed = ", ".join(f"{b.index} ({b.module or b.output.name})" for b in found)
    raise UsageError(f"no block '{ref}' (blocks: {listed}; `inspect` lists them)")


def _writer(block: mblocks.Block, sub: mblocks.Sublayer) -> Writer:
    members = {id(n) for n in block.nodes}
    tensor, biases = sub.branch, []
    while True:
        node = mgraph.producer(tensor)
        if node is None or id(node) not in members:
            raise NotApplicable(f"block {block.index}: the branch into residual Add '{sub.add.name}' has no "
                                "projection to start at zero")
        if mgraph.layer_info(node) is not None:
            return Writer(node.name, tuple(biases))
        constant = [k for k, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
        if node.op == "Add" and len(node.inputs) == 2 and len(constant) == 1:
            biases.append((node.name, constant[0]))
            tensor = node.inputs[1 - constant[0]]
        elif node.op in _ZERO_PRESERVING:
            tensor = node.inputs[0]
        else:
            raise NotApplicable(
                f"block {block.index}: the branch into residual Add '{sub.add.name}' ends in {node.op} "
                f"'{node.name}', not a projection (MatMul/Gemm/Conv, a bias Add, a Reshape) that can start at zero"
            )


def plan(model: onnx.ModelProto, ref: str, graph: gs.Graph | None = None) -> tuple[mblocks.Block, list[Writer]]:
    """The block after which to insert and the writers of its copy; NotApplicable with the reason otherwise."""
    block = find_block(model, ref, graph)
    name = f"block {block.index}" + (f" ({block.module})" if block.module else "")
    if block.kind == "post-norm":
        raise NotApplicable(
            f"{name} is post-norm (a {' and a '.join(sorted(set(block.norms)))} after its residual Adds): a copy "
            "whose writers are zero computes norm(x), not x, so no new block after it starts as the identity"
        )
    nested = [n.name for n in block.nodes if any(isinstance(v, gs.Graph) for v in n.attrs.values())]
    if nested:
        raise NotApplicable(f"{name}: node '{nested[0]}' holds a subgraph; blocks with control flow are not copied")
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


def _set_zero(node: gs.Node, k: int) -> None:
    tensor = node.inputs[k]
    mgraph.set_input_constant(node, k, np.zeros(tensor.shape, mgraph.dtype_of(tensor)))


def _initialise(copier: _Copier, block: mblocks.Block, writers: list[Writer], init: str,
                rng: np.random.Generator) -> None:
    """Writers (and their biases) to zero; with `init` random or zero, the other layers' weights too."""
    written = {w.node for w in writers}
    for node in block.nodes:
        info = mgraph.layer_info(node)
        if info is None:
            continue
        new = copier.nodes[node.name]
        k = mgraph.weight_index(node)
        if node.name in written or init == "zero":
            _set_zero(new, k)
            if len(new.inputs) > 2 and isinstance(new.inputs[2], gs.Constant):
                _set_zero(new, 2)
        elif init == "random":
            w = mgraph.values(new.inputs[k])
            mgraph.set_input_constant(new, k, rng.normal(0.0, float(w.std()) or 0.02, w.shape).astype(w.dtype))
    for w in writers:
        for name, k in w.biases:
            _set_zero(copier.nodes[name], k)


@register
class BlockPass(MorphPass):
    """Insert a new pre-norm transformer block after block L that computes the identity at first.

    The new block is a copy of block L (its norms, attention and feed-forward, with their own
    weights) whose writers, the attention output projection and the feed-forward down projection
    (with their biases), are zero: each sublayer adds exactly 0 to the residual stream, so the
    block passes its input through unchanged (the LLaMA Pro construction). Post-norm blocks
    (BERT's) are refused: their norm after the residual Add would not be the identity.
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
        model = mgraph.model_of(model)
        graph = mgraph.import_graph(model)
        # the plan was made on the read view; the same block is found again in the editable graph
        block, writers = plan(model, str(planned[0].index), graph)
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
                 block.index, ", ".join(w.node for w in writers))
        return PassResult(mgraph.export_model(graph, like=model), True)
