"""Skip connections (Auto-Keras, NASH): add an earlier tensor A to a later tensor B, or concatenate it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import channel_edits, channels
from onnxmorph.contract.passinfra import MorphPass, Param, PassResult, layer_name
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import build
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import widening as wsolve
from onnxmorph.numerics.geometry import pointwise

MODES = ("add", "concat")


def match_strides(source: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per spatial axis the stride s with `(n_A - 1) // s + 1 == n_B` (a 1x1 kernel, no padding), or None."""
    strides = []
    for a, b in zip(source, target):
        if b > a or b < 1:
            return None
        s = max(1, -(-a // b))
        while s > 1 and (a - 1) // (s - 1) + 1 == b:
            s -= 1  # the smallest stride that gives b, so the samples spread over the whole map
        if (a - 1) // s + 1 != b:
            return None
        strides.append(s)
    return tuple(strides)


def is_ancestor(source: gs.Tensor, target: gs.Tensor) -> bool:
    """True when `target` is computed from `source` (an iterative walk up from `target`)."""
    seen: set[str] = set()
    queue = deque([target])
    while queue:
        tensor = queue.popleft()
        if tensor.name == source.name:
            return True
        for node in tensor.inputs:
            for t in node.inputs:
                if t.name not in seen and not isinstance(t, gs.Constant):
                    seen.add(t.name)
                    queue.append(t)
    return False


def nearest_layer_op(tensor: gs.Tensor) -> str | None:
    """The op of the closest Conv/ConvTranspose/Gemm/MatMul above `tensor` (None when there is none)."""
    seen = {tensor.name}
    queue = deque([tensor])
    while queue:
        for node in queue.popleft().inputs:
            if node.op in mgraph.LAYER_OPS:
                return node.op
            for t in node.inputs:
                if t.name not in seen and not isinstance(t, gs.Constant):
                    seen.add(t.name)
                    queue.append(t)
    return None


def _tensor(graph: gs.Graph, name: str, flag: str) -> gs.Variable:
    tensor = graph.tensors().get(name)
    if tensor is None:
        node = mgraph.find_node(graph, name)
        if not node.outputs:
            raise NotApplicable(f"{flag} '{name}': the node has no output")
        tensor = node.outputs[0]
    if isinstance(tensor, gs.Constant):
        raise NotApplicable(f"{flag} '{name}' is a constant, not a computed tensor")
    return tensor


@dataclass(frozen=True)
class SkipPlan:
    source: str
    target: str
    channels_a: int
    channels_b: int
    rank: int
    strides: tuple[int, ...]
    dtype: np.dtype
    coupling: channels.Coupling | None = None


@register
class SkipPass(MorphPass):
    """Add a skip connection from tensor A to a later tensor B (A must be an ancestor of B).

    add: B becomes B + proj(A), proj a 1x1 Conv (a Gemm for [N, C] tensors) initialised to zero,
    strided to match B's spatial size and mapping A's channels to B's. concat: B becomes
    Concat(B, A) on the channel axis (A subsampled by a strided 1x1 MaxPool when it is larger); the
    channel analysis of the width morph follows A's channels through batch-norms, activations,
    pooling, depthwise convs and Flatten to the next layers, which get zero weights on them.
    Names: `<B>/morph_skip/proj`, `<B>/morph_skip/add` or `<B>/morph_skip/concat`
    (and `/pool`); consumers of B read the new tensor `<B>/morph_skip/out`, except when B is a graph
    output, whose name stays on the sum.
    """

    name = "skip"
    summary = "add a skip connection from tensor A to a later tensor B (zero-initialised add, or concat)"
    params = (
        Param("source", layer_name, "tensor A: its name, or the node or module making it, as inspect "
              "prints them", flag="--from", metavar="A"),
        Param("target", layer_name, "tensor B, computed from A: its name, or the node or module making "
              "it", flag="--to", metavar="B"),
        Param("mode", str, "add (B + zero 1x1 projection of A) or concat (B, A with zero consumer weights)",
              default="add", choices=MODES),
    )

    def _plan(self, model: mgraph.Analysis) -> SkipPlan:
        view = mgraph.read_view(model)
        a = _tensor(view, self.source, "--from")
        b = _tensor(view, self.target, "--to")
        where = f"skip from '{a.name}' to '{b.name}'"
        if a.name == b.name:
            raise NotApplicable(f"{where}: A and B are the same tensor")
        if not is_ancestor(a, b):
            cycle = " (B comes before A: the skip would make a cycle)" if is_ancestor(b, a) else ""
            raise NotApplicable(f"{where}: A is not an ancestor of B{cycle}")
        if not b.inputs:
            raise NotApplicable(f"{where}: B is a graph input")
        if not b.outputs and not mgraph.is_graph_output(view, b):
            raise NotApplicable(f"{where}: nothing reads B, so a skip into it would change nothing")
        shapes = mgraph.tensor_shapes(model)
        sa, sb = shapes.get(a.name), shapes.get(b.name)
        if sa is None or sb is None or None in sa or None in sb:
            unknown = a.name if sa is None or None in sa else b.name
            raise NotApplicable(f"{where}: the shape of '{unknown}' is unknown (shape inference cannot tell it)")
        if len(sa) != len(sb) or len(sa) < 2:
            raise NotApplicable(f"{where}: A has shape {list(sa)} and B {list(sb)}; need the same rank, [N, C, ...]")
        if sa[0] != sb[0]:
            raise NotApplicable(f"{where}: batch sizes {sa[0]} and {sb[0]} differ")
        if len(sa) > 2:
            # Channels sit on axis 1 after a Conv; after a MatMul ([N, T, C]) they are last.
            for t in (b, a):
                op = nearest_layer_op(t)
                if op in ("Gemm", "MatMul"):
                    raise NotApplicable(f"{where}: '{t.name}' comes from a {op}, so its channels are not on axis 1 "
                                        f"(shape {list(shapes[t.name])}); only [N, C, ...] tensors of conv nets "
                                        "and [N, C] vectors are supported")
        strides = match_strides(sa[2:], sb[2:])
        if strides is None:
            raise NotApplicable(f"{where}: A's spatial size {list(sa[2:])} cannot be strided down to B's "
                                f"{list(sb[2:])}")
        dtype = self._dtype(model, a, b, where)
        coupling = None
        if self.mode == "concat":
            coupling = self._coupling(model, view, b, where, int(sb[1]), int(sa[1]))
        return SkipPlan(a.name, b.name, int(sa[1]), int(sb[1]), len(sa), strides, dtype, coupling)

    def _dtype(self, model: onnx.ModelProto, a: gs.Tensor, b: gs.Tensor, where: str) -> np.dtype:
        # Intermediate tensors rarely carry a type in the graph; a float model computes in its input's type.
        known = [np.dtype(t.dtype) for t in (a, b) if t.dtype is not None]
        if not known:
            known = [np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                     for i in mgraph.model_of(model).graph.input if i.type.tensor_type.elem_type]
        if not known or known[0].kind != "f" or any(k != known[0] for k in known):
            raise NotApplicable(f"{where}: needs float tensors of one type, found {[str(k) for k in known]}")
        return known[0]

    def _coupling(self, model: onnx.ModelProto, view: gs.Graph, b: gs.Tensor, where: str, channels_b: int,
                  channels_a: int) -> channels.Coupling:
        """What A's channels touch downstream of B (the width machinery, forward only)."""
        if mgraph.is_graph_output(view, b):
            raise NotApplicable(f"{where}: B is a graph output; concatenating would change the model's output")
        if not b.outputs:
            raise NotApplicable(f"{where}: B has no consumer")
        try:
            coupling = channels.analyze(view, b.name, 1, [(channels_b, channels_a)], mgraph.tensor_shapes(model),
                                        old=channels_b, backward=False)
        except NotApplicable as exc:
            raise NotApplicable(f"{where}: {exc}") from exc
        if coupling.producers:
            raise NotApplicable(f"{where}: B's channels are tied to layer '{coupling.producers[0].node}' (a sum or "
                                "concatenation), which would need A's channels too; use --mode add")
        if coupling.lrn:
            raise NotApplicable(f"{where}: LRN '{coupling.lrn[0]}' would mix A's channels into B's; use --mode add")
        if coupling.uniform:
            raise NotApplicable(f"{where}: '{coupling.uniform[0]}' normalises over B's channels, A's would change "
                                "it; use --mode add")
        # Forward only: every widened tensor must get A's channels from B, none from a stream of its own
        # (the other operand of a residual Add, say), which would need new channels there too.
        widened = set(coupling.tensors) | {b.name}
        tensors = view.tensors()
        for name in coupling.tensors:
            producer = mgraph.producer(tensors[name])
            if name != b.name and (producer is None or not any(t.name in widened for t in producer.inputs)):
                where_from = f"{producer.op} '{producer.name}'" if producer is not None else "a graph input"
                raise NotApplicable(f"{where}: B's channels meet '{name}' (from {where_from}), which would need "
                                    "A's channels too; use --mode add")
        for change in coupling.groups:
            if change.derived is not None:
                raise NotApplicable(f"{where}: grouped Conv '{change.node}' would need new groups; use --mode add")
        for param in coupling.params:
            if not channel_edits.extendable(param):
                raise NotApplicable(f"{where}: {param.op} '{param.node}' has a per-channel {param.role} that "
                                    "cannot be extended")
        for consumer in coupling.consumers:
            node = mgraph.find_node(view, consumer.node)
            if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
                raise NotApplicable(f"{where}: consumer Conv '{node.name}' is grouped; its groups cannot take A")
            users = [n for n in node.inputs[1].outputs if n is not node]
            if users or not isinstance(node.inputs[1], gs.Constant):
                raise NotApplicable(f"{where}: consumer '{node.name}' has a shared or computed weight")
        return coupling

    def requires(self, model: mgraph.ModelOrAnalysis) -> SkipPlan:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: SkipPlan) -> dict[str, Any]:
        return {"mode": self.mode, "strides": "x".join(map(str, plan.strides)) or "none"}

    def call(self, model: mgraph.ModelOrAnalysis, plan: SkipPlan) -> PassResult:
        model = mgraph.model_of(model)
        graph = mgraph.import_graph(model)
        tensors = graph.tensors()
        a, b = tensors[plan.source], tensors[plan.target]
        namer = mgraph.Namer(graph)
        scope = build.fresh_scope(namer, b.name, "morph_skip")
        nd = plan.rank - 2
        if self.mode == "add":
            joined = self._redirect(graph, namer, scope, b)
            if plan.rank == 2:
                # Gemm's bias C is required before opset 11.
                proj = build.LayerSpec("Gemm", np.zeros((plan.channels_b, plan.channels_a)), np.zeros(plan.channels_b))
            else:
                geometry = pointwise(nd, strides=plan.strides)
                proj = build.LayerSpec("Conv", np.zeros((plan.channels_b, plan.channels_a) + (1,) * nd),
                                       geometry=geometry)
            projected = build.add_layer(graph, namer, scope, "proj", a, proj, plan.dtype)
            source, added = joined
            graph.nodes.append(gs.Node("Add", name=namer(scope, "add"), inputs=[source, projected], outputs=[added]))
        else:
            readers = list(b.outputs)
            sampled: gs.Tensor = a
            if any(s != 1 for s in plan.strides):
                sampled = gs.Variable(namer(scope, "pool", "out"), dtype=plan.dtype)
                graph.nodes.append(gs.Node("MaxPool", name=namer(scope, "pool"), inputs=[a], outputs=[sampled],
                                           attrs={"kernel_shape": [1] * nd, "strides": list(plan.strides),
                                                  "pads": [0] * (2 * nd)}))
            joined_out = gs.Variable(namer(scope, "out"), dtype=plan.dtype)
            graph.nodes.append(gs.Node("Concat", name=namer(scope, "concat"), inputs=[b, sampled],
                                       outputs=[joined_out], attrs={"axis": 1}))
            mgraph.replace_all_uses(graph, b, joined_out, readers)
            assert plan.coupling is not None
            self._extend(graph, plan.coupling)
        return PassResult(mgraph.export_model(graph, like=model), True)

    @staticmethod
    def _extend(graph: gs.Graph, c: channels.Coupling) -> None:
        """Give everything downstream of B room for A's channels: zero consumer weights, neutral parameters
        (a depthwise layer on the way gets random filters for A's channels: their outputs meet zero weights)."""
        rng = np.random.default_rng(0)
        channel_edits.grow_coupling(
            graph, c, lambda param, array: channel_edits.extend_param(param, array, c, rng),
            lambda node, w, q: wsolve.solve_widen_outgoing(w, q.weight_axis, c.spaces[q.slot.space].inserts, rng,
                                                           method="netmorph", offset=q.offset, block=q.block),
            rng)

    def _redirect(self, graph: gs.Graph, namer: mgraph.Namer, scope: str,
                  b: gs.Variable) -> tuple[gs.Tensor, gs.Variable]:
        """(the tensor holding B's old value, the tensor the sum must write) with B's readers rewired.

        A graph output B keeps its name: the sum writes it, B's old value is `<scope>/in`.
        """
        after = gs.Variable(namer(scope, "out"), dtype=b.dtype)
        renamed = namer(scope, "in") if mgraph.is_graph_output(graph, b) else None
        mgraph.replace_all_uses(graph, b, after, renamed=renamed)
        return b, after
