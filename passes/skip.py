"""Skip connections (Auto-Keras, NASH): add an earlier tensor A to a later tensor B, or concatenate it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph import build
from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable
from onnxmorph.passinfra import MorphPass, Param, PassResult, layer_name, register

MODES = ("add", "concat")
# Ops whose input channels can grow by columns of zero weights (the concat consumers).
CONCAT_CONSUMERS = ("Conv", "Gemm", "MatMul")


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


@register
class SkipPass(MorphPass):
    """Add a skip connection from tensor A to a later tensor B (A must be an ancestor of B).

    add: B becomes B + proj(A), proj a 1x1 Conv (a Gemm for [N, C] tensors) initialised to zero,
    strided to match B's spatial size and mapping A's channels to B's. concat: B becomes
    Concat(B, A) on the channel axis (A subsampled by a strided 1x1 MaxPool when it is larger), and
    every consumer of B, which must be a Conv (group 1), Gemm or MatMul, gets zero weights on A's
    channels. Names: `<B>/morph_skip/proj`, `<B>/morph_skip/add` or `<B>/morph_skip/concat`
    (and `/pool`); consumers of B read the new tensor `<B>/morph_skip/out`, except when B is a graph
    output, whose name stays on the sum.
    """

    name = "skip"
    summary = "add a skip connection from tensor A to a later tensor B (zero-initialised add, or concat)"
    params = (
        Param("source", layer_name, "tensor A (or the node producing it)", flag="--from", metavar="A"),
        Param("target", layer_name, "tensor B, computed from A (or the node producing it)", flag="--to",
              metavar="B"),
        Param("mode", str, "add (B + zero 1x1 projection of A) or concat (B, A with zero consumer weights)",
              default="add", choices=MODES),
    )

    def _plan(self, model: onnx.ModelProto) -> SkipPlan:
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
        shapes = mgraph.tensor_shapes(model)
        sa, sb = shapes.get(a.name), shapes.get(b.name)
        if sa is None or sb is None or None in sa or None in sb:
            unknown = a.name if sa is None or None in sa else b.name
            raise NotApplicable(f"{where}: the shape of '{unknown}' is unknown (shape inference cannot tell it)")
        if len(sa) != len(sb) or len(sa) < 2:
            raise NotApplicable(f"{where}: A has shape {list(sa)} and B {list(sb)}; need the same rank, [N, C, ...]")
        if sa[0] != sb[0]:
            raise NotApplicable(f"{where}: batch sizes {sa[0]} and {sb[0]} differ")
        strides = match_strides(sa[2:], sb[2:])
        if strides is None:
            raise NotApplicable(f"{where}: A's spatial size {list(sa[2:])} cannot be strided down to B's "
                                f"{list(sb[2:])}")
        dtype = self._dtype(model, a, b, where)
        if self.mode == "concat":
            self._check_concat(view, b, where, len(sa))
        return SkipPlan(a.name, b.name, int(sa[1]), int(sb[1]), len(sa), strides, dtype)

    def _dtype(self, model: onnx.ModelProto, a: gs.Tensor, b: gs.Tensor, where: str) -> np.dtype:
        # Intermediate tensors rarely carry a type in the graph; a float model computes in its input's type.
        known = [np.dtype(t.dtype) for t in (a, b) if t.dtype is not None]
        if not known:
            known = [np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                     for i in model.graph.input if i.type.tensor_type.elem_type]
        if not known or known[0].kind != "f" or any(k != known[0] for k in known):
            raise NotApplicable(f"{where}: needs float tensors of one type, found {[str(k) for k in known]}")
        return known[0]

    def _check_concat(self, view: gs.Graph, b: gs.Tensor, where: str, rank: int) -> None:
        if mgraph.is_graph_output(view, b):
            raise NotApplicable(f"{where}: B is a graph output; concatenating would change the model's output")
        if not b.outputs:
            raise NotApplicable(f"{where}: B has no consumer")
        for node in b.outputs:
            if node.op not in CONCAT_CONSUMERS or mgraph.layer_info(node) is None or node.inputs[0] is not b:
                raise NotApplicable(
                    f"{where}: concat needs every consumer of B to be a Conv, Gemm or MatMul reading it as data; "
                    f"{node.op} '{node.name}' is not (pick the tensor just before the next layer, or use --mode add)"
                )
            if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
                raise NotApplicable(f"{where}: consumer Conv '{node.name}' is grouped; its groups cannot take A")
            if node.op == "Gemm" and (rank != 2 or node.attrs.get("transA", 0)):
                raise NotApplicable(f"{where}: consumer Gemm '{node.name}' must read B as [N, C]")
            if node.op == "MatMul" and rank != 2:
                raise NotApplicable(f"{where}: consumer MatMul '{node.name}' reads a rank-{rank} tensor")
            users = [n for n in node.inputs[1].outputs if n is not node]
            if users:
                raise NotApplicable(f"{where}: consumer '{node.name}' shares its weight with '{users[0].name}'")

    def requires(self, model: onnx.ModelProto) -> None:
        self._plan(model)

    def describe(self, model: onnx.ModelProto) -> dict[str, Any]:
        plan = self._plan(model)
        return {"mode": self.mode, "strides": "x".join(map(str, plan.strides)) or "none"}

    def call(self, model: onnx.ModelProto) -> PassResult:
        plan = self._plan(model)
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
                geometry = mgraph.ConvGeometry((1,) * nd, (0,) * nd, (0,) * nd, plan.strides, (1,) * nd, 1)
                proj = build.LayerSpec("Conv", np.zeros((plan.channels_b, plan.channels_a) + (1,) * nd),
                                       geometry=geometry)
            projected = build.add_layer(graph, namer, scope, "proj", a, proj, plan.dtype)
            source, added = joined
            graph.nodes.append(gs.Node("Add", name=namer(scope, "add"), inputs=[source, projected], outputs=[added]))
        else:
            consumers = list(b.outputs)
            sampled: gs.Tensor = a
            if any(s != 1 for s in plan.strides):
                sampled = gs.Variable(namer(scope, "pool", "out"), dtype=plan.dtype)
                graph.nodes.append(gs.Node("MaxPool", name=namer(scope, "pool"), inputs=[a], outputs=[sampled],
                                           attrs={"kernel_shape": [1] * nd, "strides": list(plan.strides),
                                                  "pads": [0] * (2 * nd)}))
            joined_out = gs.Variable(namer(scope, "out"), dtype=plan.dtype)
            graph.nodes.append(gs.Node("Concat", name=namer(scope, "concat"), inputs=[b, sampled],
                                       outputs=[joined_out], attrs={"axis": 1}))
            for node in consumers:
                node.inputs[0] = joined_out
                w = mgraph.values(node.inputs[1])
                # Conv/Gemm(transB) weights hold input channels on axis 1, MatMul and plain Gemm on axis 0.
                axis = 1 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else 0
                pad = [(0, 0)] * w.ndim
                pad[axis] = (0, plan.channels_a)
                mgraph.set_input_constant(node, 1, np.pad(w, pad))
        return PassResult(mgraph.export_model(graph, like=model), True)

    def _redirect(self, graph: gs.Graph, namer: mgraph.Namer, scope: str,
                  b: gs.Variable) -> tuple[gs.Tensor, gs.Variable]:
        """(the tensor holding B's old value, the tensor the sum must write) with B's readers rewired."""
        if mgraph.is_graph_output(graph, b):
            # The output keeps its name: B's producer now writes a new tensor, the sum writes B.
            before = gs.Variable(namer(scope, "in"), dtype=b.dtype)
            producer = b.inputs[0]
            producer.outputs[producer.outputs.index(b)] = before
            return before, b
        after = gs.Variable(namer(scope, "out"), dtype=b.dtype)
        for node in list(b.outputs):
            for k, t in enumerate(node.inputs):
                if t is b:
                    node.inputs[k] = after
        return b, after
