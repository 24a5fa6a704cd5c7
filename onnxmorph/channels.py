"""Channel coupling: every tensor, parameter and layer tied to one channel axis, for width-changing morphs.

Widening the channel axis of a tensor (a layer's output, a concatenated skip) touches much more
than its producer: batch-norm statistics, per-channel constants, depthwise convolutions (whose
group count grows), every operand of a residual sum (so every other producer of the stream),
Concat offsets, Flatten/Reshape blocks and the consumers' weights. `analyze` follows the axis in
both directions through the graph and returns a `Coupling` listing all of them, or raises
NotApplicable with one line naming the op in the way.

Vocabulary. A *space* is a set of `old` channels that grows by `inserts`: `(pos, count)` means
`count` new channels placed after old channel `pos - 1`. A *slot* says where a space sits in a
tensor: on `axis`, starting at `offset`, each channel owning `block` consecutive entries (a
Flatten gives each channel H*W columns; a depthwise conv with multiplier m gives it m). A grouped
(not depthwise) conv that reads a space gets new groups: their outputs are a *derived* space.

    coupling = analyze(graph, "conv2_out", axis=1, inserts=[(32, 16)], shapes=tensor_shapes(model))
    coupling.producers      # layers writing the channels (new filters: incoming side)
    coupling.consumers      # layers reading them (new weight columns: outgoing side)
    coupling.params         # per-channel constants to extend (BN, PRelu slopes, Mul/Add)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable

Shapes = dict[str, "tuple[int | None, ...] | None"]

# Ops applied channel by channel with one data input (index 0); other inputs are constants.
UNARY = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus", "Softsign",
    "Identity", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "HardSwish", "Mish", "Cast",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Dropout", "Clip", "Shrink",
}
# Elementwise ops with numpy broadcasting between any number of inputs.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Ops that map a zero channel to zero given the new parameters onnxmorph gives it (0 bias/shift,
# unit scale, BN mean 0 var 1): a channel that is 0 at the producer stays 0 through them.
ZERO_PRESERVING = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Softsign", "Identity", "Abs", "Neg", "Erf", "Gelu",
    "HardSwish", "Mish", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "ThresholdedRelu", "Dropout", "Shrink",
    "Add", "Sub", "Mul", "Sum", "Max", "Min", "Mean", "PRelu", "BatchNormalization", "InstanceNormalization",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LRN", "Concat",
    "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Resize", "Upsample", "Pad",
    "Conv", "ConvTranspose", "Gemm", "MatMul",
}
REFUSED = {
    "LayerNormalization": "normalises over the widened axis",
    "Softmax": "mixes the channels", "LogSoftmax": "mixes the channels", "Hardmax": "mixes the channels",
    "Shape": "reads the channel count", "Size": "reads the channel count",
}


@dataclass(frozen=True)
class Space:
    """A set of `old` channels growing by `inserts`; `derived_from` names the grouped conv that made it."""

    id: int
    old: int
    inserts: tuple[tuple[int, int], ...]
    derived_from: str | None = None

    @property
    def added(self) -> int:
        return sum(c for _, c in self.inserts)


@dataclass(frozen=True)
class Slot:
    """Where a space sits in a tensor: its axis, the first entry, entries per channel."""

    tensor: str
    axis: int
    offset: int
    block: int
    space: int


@dataclass(frozen=True)
class Producer:
    """A layer whose output channels are the space: gets new filters on `weight_axis` (and bias)."""

    node: str
    op: str
    slot: Slot
    weight_axis: int
    groups: int = 1
    ungroup: int = 0  # > 1: a grouped Conv (this many groups) that becomes dense so new channels go last


@dataclass(frozen=True)
class Consumer:
    """A layer reading the space: gets new weight entries on `weight_axis` (`offset`/`block` there)."""

    node: str
    op: str
    slot: Slot
    weight_axis: int
    offset: int
    block: int


@dataclass(frozen=True)
class Param:
    """A per-channel constant (input `index` of `node`) extended on `axis` with the space's channels."""

    node: str
    op: str
    index: int
    axis: int
    offset: int
    block: int
    space: int
    role: str  # what the new entries are filled with: "scale", "shift", "var", "copy-only", "filter", "bias"


@dataclass(frozen=True)
class GroupChange:
    """A Conv whose group count grows: depthwise (`derived` None) or grouped with new groups."""

    node: str
    added_groups: int
    derived: int | None = None
    new_filters: tuple[tuple[int, int], ...] = ()  # (output index, count) of the new groups' filters


@dataclass(frozen=True)
class ShapeFix:
    """A constant shape input (Reshape target, Resize sizes) whose entry `position` follows `tensor`'s `axis`."""

    node: str
    index: int
    position: int
    tensor: str
    axis: int


@dataclass
class Coupling:
    """Everything tied to a widened channel axis; see the module docstring."""

    spaces: list[Space] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    groups: list[GroupChange] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    lrn: list[str] = field(default_factory=list)
    # per space id: how many of its first new channels must be exactly 0 (inside an old channel's LRN window)
    lrn_guard: dict[int, int] = field(default_factory=dict)
    # per space id: the ops between producers and consumers that do not map 0 to 0
    zero_blockers: dict[int, list[str]] = field(default_factory=dict)

    def added(self, tensor: str, axis: int) -> int:
        """How many entries `tensor`'s `axis` gains."""
        return sum(self.spaces[s.space].added * s.block for s in self.slots if s.tensor == tensor and s.axis == axis)

    def params_by_input(self) -> dict[tuple[str, int], list[Param]]:
        """The per-channel constants grouped by (node, input index), last offset first.

        One constant can hold several slots (e.g. after a Concat); extending the last one first
        keeps the earlier offsets valid.
        """
        grouped: dict[tuple[str, int], list[Param]] = {}
        for param in self.params:
            grouped.setdefault((param.node, param.index), []).append(param)
        return {k: sorted(v, key=lambda q: q.offset, reverse=True) for k, v in grouped.items()}

    @property
    def tensors(self) -> list[str]:
        return sorted({s.tensor for s in self.slots})

    @property
    def layers(self) -> list[str]:
        """Names of the layers that change: producers first, then consumers and group changes."""
        names: list[str] = []
        for name in [p.node for p in self.producers] + [c.node for c in self.consumers] + [g.node for g in self.groups]:
            if name not in names:
                names.append(name)
        return names


def _shape(shapes: Shapes, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.values.shape)
    shape = shapes.get(tensor.name)
    if shape is None and tensor.shape is not None:
        shape = tuple(d if isinstance(d, int) else None for d in tensor.shape)
    return shape


def _ints(value: object) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _prod(dims: Sequence[int | None]) -> int | None:
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= int(d)
    return out


def map_reshape(src: Sequence[int | None], dst: Sequence[int | None], axis: int, offset: int,
                block: int) -> tuple[int, int, int] | None:
    """Where a channel slot on `src`'s `axis` lands after reshaping to `dst`: (axis, offset, block).

    None when the channels do not stay whole blocks of one axis (a channel shuffle splits them).
    """
    before, rest = _prod(src[:axis]), _prod(src[axis:])
    inner = _prod(src[axis + 1:])
    if before is None or rest is None or inner is None:
        return None
    for a in range(len(dst)):
        if _prod(dst[:a]) != before or _prod(dst[a:]) != rest or dst[a] == 1 and a + 1 < len(dst):
            continue
        inner_dst = _prod(dst[a + 1:])
        if inner_dst is None or inner_dst == 0:
            return None
        if inner % inner_dst == 0:
            k = inner // inner_dst
            return a, offset * k, block * k
        if inner_dst % inner == 0:
            k = inner_dst // inner
            if offset % k == 0 and block % k == 0:
                return a, offset // k, block // k
        return None
    return None


class _Analysis:
    def __init__(self, graph: gs.Graph, shapes: Shapes, *, allow_backward: bool,
                 ungroup: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        self.ungroup = ungroup
        self.shapes = shapes
        self.allow_backward = allow_backward
        self.result = Coupling()
        self.seen: set[Slot] = set()
        self.queue: deque[tuple[Slot, str]] = deque()
        self.done: set[tuple[str, Slot]] = set()
        self.depthwise_done: set[tuple[str, Slot]] = set()
        self.outputs = {t.name for t in graph.outputs}
        self.inputs = {t.name for t in graph.inputs}

    # ---------------------------------------------------------------- bookkeeping

    def space(self, k: int) -> Space:
        return self.result.spaces[k]

    def add_slot(self, tensor: gs.Tensor, axis: int, offset: int, block: int, space: int, origin: str) -> None:
        if isinstance(tensor, gs.Constant):
            raise NotApplicable(f"constant '{tensor.name}' would need to carry the channels ({origin})")
        rank = len(_shape(self.shapes, tensor) or ()) or None
        if rank is not None:
            axis %= rank
        slot = Slot(tensor.name, axis, offset, block, space)
        if slot in self.seen:
            return
        for other in self.seen:
            if other.tensor != slot.tensor:
                continue
            if other.axis != slot.axis:
                raise NotApplicable(f"tensor '{slot.tensor}' would widen on two axes ({origin})")
            size = self.space(other.space).old * other.block
            mine = self.space(space).old * block
            if offset < other.offset + size and other.offset < offset + mine:
                raise NotApplicable(f"tensor '{slot.tensor}' would widen twice over the same channels ({origin})")
        if tensor.name in self.outputs:
            raise NotApplicable(f"graph output '{tensor.name}' exposes the channels ({origin})")
        if tensor.name in self.inputs:
            raise NotApplicable(f"graph input '{tensor.name}' carries the channels ({origin})")
        self.seen.add(slot)
        self.result.slots.append(slot)
        self.queue.append((slot, origin))

    def blocker(self, node: gs.Node, space: int) -> None:
        self.result.zero_blockers.setdefault(space, [])
        if node.name not in self.result.zero_blockers[space]:
            self.result.zero_blockers[space].append(node.name)

    def add_param(self, node: gs.Node, index: int, axis: int, offset: int, block: int, space: int, role: str) -> None:
        const = node.inputs[index]
        others = [n for n in const.outputs if n is not node]
        if others:
            raise NotApplicable(
                f"{node.op} '{node.name}': its constant '{const.name}' is shared with '{others[0].name}'"
            )
        param = Param(node.name, node.op, index, axis, offset, block, space, role)
        if param not in self.result.params:
            self.result.params.append(param)

    # ---------------------------------------------------------------- traversal

    def run(self) -> Coupling:
        while self.queue:
            slot, origin = self.queue.popleft()
            tensor = self.graph_tensors[slot.tensor]
            if tensor.inputs and self.allow_backward:
                self.visit(tensor.inputs[0], slot, tensor, backward=True)
            for node in list(tensor.outputs):
                self.visit(node, slot, tensor, backward=False)
        return self.result

    def visit(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, *, backward: bool) -> None:
        key = (node.name + ("<" if backward else ">") + tensor.name, slot)
        if key in self.done:
            return
        self.done.add(key)
        if backward and self.space(slot.space).derived_from == node.name:
            return  # the grouped conv whose new groups made this space: already handled
        op = node.op
        where = f"{op} '{node.name}'"
        if node.domain not in ("", "ai.onnx", None):
            raise NotApplicable(f"{where} (domain {node.domain}) is in the way of the channels")
        if op in REFUSED:
            if op in ("Softmax", "LogSoftmax", "Hardmax"):
                self.softmax(node, slot, tensor)
                return
            raise NotApplicable(f"{where} {REFUSED[op]}: widening '{tensor.name}' cannot preserve the function")
        if op not in ZERO_PRESERVING:
            self.blocker(node, slot.space)
        if op in LAYERS:
            self.layer(node, slot, tensor, backward)
        elif op in UNARY or op in ELEMENTWISE:
            self.elementwise(node, slot, tensor)
        elif op in NORMS:
            self.norm(node, slot, tensor)
        elif op in POOLS:
            self.pool(node, slot, tensor)
        elif op == "LRN":
            self.lrn(node, slot, tensor)
        elif op == "Concat":
            self.concat(node, slot, tensor, backward)
        elif op in RESHAPES:
            self.reshape(node, slot, tensor, backward)
        elif op == "Transpose":
            self.transpose(node, slot, tensor, backward)
        elif op == "Pad":
            self.pad(node, slot, tensor)
        elif op in ("Resize", "Upsample"):
            self.resize(node, slot, tensor)
        else:
            raise NotApplicable(f"{where} is in the way of the channels of '{tensor.name}' (not supported)")

    def data_outputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [t for t in node.outputs if t.outputs or t.name in self.outputs]

    def through(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, axis: int | None = None,
                offset: int | None = None, block: int | None = None) -> None:
        """The slot continues, unchanged unless told, on the node's first input and first output."""
        axis = slot.axis if axis is None else axis
        offset = slot.offset if offset is None else offset
        block = slot.block if block is None else block
        where = f"{node.op} '{node.name}'"
        extra = self.data_outputs(node)[1:]
        if extra:
            raise NotApplicable(f"{where}: its extra output '{extra[0].name}' is used (not supported)")
        for t in (node.inputs[0], node.outputs[0]):
            if t is not tensor:
                self.add_slot(t, axis, offset, block, slot.space, where)

    # ---------------------------------------------------------------- op rules

    def elementwise(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        where = f"{node.op} '{node.name}'"
        rank = len(_shape(self.shapes, tensor) or ()) or (slot.axis + 1)
        from_right = rank - slot.axis
        full = _shape(self.shapes, tensor)
        size = full[slot.axis] if full else None
        data_inputs = [0] if node.op in UNARY else range(len(node.inputs))
        if node.op == "Dropout":
            extra = [t for t in node.outputs[1:] if t.outputs or t.name in self.outputs]
            if extra:
                raise NotApplicable(f"{where}: its mask output '{extra[0].name}' is used (not supported)")
        if node.op == "Clip":
            for k in (1, 2):
                if len(node.inputs) > k and node.inputs[k].name and not isinstance(node.inputs[k], gs.Constant):
                    raise NotApplicable(f"{where}: its bound '{node.inputs[k].name}' is computed")
                if len(node.inputs) > k and isinstance(node.inputs[k], gs.Constant) and node.inputs[k].values.size > 1:
                    raise NotApplicable(f"{where}: its bound '{node.inputs[k].name}' is not a scalar")
            lo = node.attrs.get("min", None)
            hi = node.attrs.get("max", None)
            if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.size:
                lo = float(np.asarray(node.inputs[1].values).reshape(-1)[0])
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.size:
                hi = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
            if (lo is not None and lo > 0) or (hi is not None and hi < 0):
                self.blocker(node, slot.space)
        if node.op in ("Div", "Pow") and tensor is not node.inputs[0]:
            self.blocker(node, slot.space)  # 1/0 and c**0 are not 0
        for k in data_inputs:
            t = node.inputs[k]
            if t is tensor or not t.name:
                continue
            shape = _shape(self.shapes, t)
            r = len(shape) if shape is not None else rank
            a = r - from_right
            if a < 0:
                continue
            dim = shape[a] if shape is not None else size
            if dim == 1 and size != 1:
                continue
            if isinstance(t, gs.Constant):
                role = {"Add": "shift", "Sub": "shift", "Mul": "scale", "Div": "scale", "PRelu": "slope",
                        "Pow": "scale"}.get(node.op, "copy-only")
                if node.op in ("Max", "Min", "Mean", "Sum"):
                    self.blocker(node, slot.space)
                self.add_param(node, k, a, slot.offset, slot.block, slot.space, role)
            else:
                self.add_slot(t, a, slot.offset, slot.block, slot.space, where)
        if node.op in UNARY:
            for k in range(1, len(node.inputs)):
                t = node.inputs[k]
                if t.name and not isinstance(t, gs.Constant) and node.op != "Dropout":
                    raise NotApplicable(f"{where}: its input '{t.name}' is computed")
        out = node.outputs[0]
        if out is not tensor:
            shape = _shape(self.shapes, out)
            r = len(shape) if shape is not None else rank
            self.add_slot(out, r - from_right, slot.offset, slot.block, slot.space, where)

    def norm(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        where = f"{node.op} '{node.name}'"
        if slot.axis != 1 or tensor is not node.inputs[0] and tensor is not node.outputs[0]:
            raise NotApplicable(f"{where} normalises axis 1, the channels are on axis {slot.axis}")
        for k in NORMS[node.op]:
            if len(node.inputs) <= k or not isinstance(node.inputs[k], gs.Constant):
                raise NotApplicable(f"{where}: its parameter {k} is not a constant")
            role = {1: "scale", 2: "shift", 3: "shift", 4: "var"}[k]
            self.add_param(node, k, 0, slot.offset, slot.block, slot.space, role)
        self.through(node, slot, tensor)

    def pool(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        if slot.axis != 1:
            raise NotApplicable(f"{node.op} '{node.name}' pools over the widened axis {slot.axis}")
        self.through(node, slot, tensor)

    def lrn(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        if slot.axis != 1:
            raise NotApplicable(f"LRN '{node.name}' works on axis 1, the channels are on axis {slot.axis}")
        # LRN sums a window of neighbouring channels by position: new channels are harmless only after
        # the last old channel (in between they would shift the old channels' windows), and the first
        # ceil((size - 1) / 2) of them, which the last old channels' windows reach, must be exactly 0
        shape = _shape(self.shapes, tensor)
        size = shape[1] if shape else None
        for pos, _count in self.space(slot.space).inserts:
            if size is None or slot.offset + pos * slot.block != size:
                raise NotApplicable(
                    f"LRN '{node.name}' sums neighbouring channels: new channels would sit between old ones "
                    f"of '{tensor.name}' and change their sums"
                )
        reach = int(node.attrs.get("size", 1)) // 2  # ceil((size - 1) / 2)
        guard = -(-reach // slot.block)
        self.result.lrn_guard[slot.space] = max(self.result.lrn_guard.get(slot.space, 0), guard)
        if node.name not in self.result.lrn:
            self.result.lrn.append(node.name)
        self.through(node, slot, tensor)

    def softmax(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        shape = _shape(self.shapes, tensor)
        rank = len(shape) if shape else None
        axis = int(node.attrs.get("axis", -1 if self.graph.opset >= 13 else 1))
        if rank is not None:
            axis %= rank
            covers = slot.axis == axis if self.graph.opset >= 13 else slot.axis >= axis
            if not covers:
                self.through(node, slot, tensor)
                return
        raise NotApplicable(f"{node.op} '{node.name}' mixes the channels of '{tensor.name}': it cannot be preserved")

    def concat(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, backward: bool) -> None:
        where = f"Concat '{node.name}'"
        out = node.outputs[0]
        rank = len(_shape(self.shapes, out) or ()) or None
        axis = int(node.attrs.get("axis", 1))
        if rank is not None:
            axis %= rank
        if axis != slot.axis:
            for t in [*node.inputs, out]:
                if t is not tensor:
                    self.add_slot(t, slot.axis, slot.offset, slot.block, slot.space, where)
            return
        starts = []
        start = 0
        for t in node.inputs:
            shape = _shape(self.shapes, t)
            if shape is None or shape[axis] is None:
                raise NotApplicable(f"{where}: the size of '{t.name}' on the concat axis is unknown")
            starts.append(start)
            start += int(shape[axis])
        span = self.space(slot.space).old * slot.block
        if backward:
            for k, t in enumerate(node.inputs):
                size = _shape(self.shapes, t)[axis]
                if starts[k] <= slot.offset and slot.offset + span <= starts[k] + size:
                    self.add_slot(t, axis, slot.offset - starts[k], slot.block, slot.space, where)
                    return
            raise NotApplicable(f"{where}: the channels of '{out.name}' span several of its inputs")
        for k, t in enumerate(node.inputs):
            if t is tensor:
                self.add_slot(out, axis, starts[k] + slot.offset, slot.block, slot.space, where)

    def reshape(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, backward: bool) -> None:
        where = f"{node.op} '{node.name}'"
        src, dst = node.inputs[0], node.outputs[0]
        if backward:
            src, dst = dst, src
        s_shape, d_shape = _shape(self.shapes, src), _shape(self.shapes, dst)
        if s_shape is None or d_shape is None:
            raise NotApplicable(f"{where}: the shapes around it are unknown, cannot follow the channels")
        mapped = map_reshape(s_shape, d_shape, slot.axis, slot.offset, slot.block)
        if mapped is None:
            raise NotApplicable(f"{where} splits the channel axis of '{src.name}' (e.g. a channel shuffle)")
        axis, offset, block = mapped
        if node.op == "Reshape":
            target = node.inputs[1] if len(node.inputs) > 1 else None
            if not isinstance(target, gs.Constant):
                raise NotApplicable(f"{where}: its target shape is computed, cannot resize it")
            values = _ints(target.values)
            out_axis = axis if not backward else slot.axis
            if values[out_axis] == 0:
                raise NotApplicable(f"{where}: its target copies the channel count (0), cannot follow it")
            if values[out_axis] != -1:
                fix = ShapeFix(node.name, 1, out_axis, node.outputs[0].name, out_axis)
                if fix not in self.result.shape_fixes:
                    others = [n for n in target.outputs if n is not node]
                    if others:
                        raise NotApplicable(f"{where}: its target shape is shared with '{others[0].name}'")
                    self.result.shape_fixes.append(fix)
        self.add_slot(dst, axis, offset, block, slot.space, where)

    def transpose(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, backward: bool) -> None:
        shape = _shape(self.shapes, node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None:
            if shape is None:
                raise NotApplicable(f"Transpose '{node.name}': unknown rank, cannot follow the channels")
            perm = list(range(len(shape)))[::-1]
        perm = [int(p) for p in perm]
        if backward:
            self.add_slot(node.inputs[0], perm[slot.axis], slot.offset, slot.block, slot.space,
                          f"Transpose '{node.name}'")
        else:
            self.add_slot(node.outputs[0], perm.index(slot.axis), slot.offset, slot.block, slot.space,
                          f"Transpose '{node.name}'")

    def pad(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        where = f"Pad '{node.name}'"
        shape = _shape(self.shapes, node.inputs[0])
        if "pads" in node.attrs:
            pads = _ints(node.attrs["pads"])
            value = float(node.attrs.get("value", 0.0))
        elif len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            pads = _ints(node.inputs[1].values)
            value = 0.0
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.size:
                value = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
            if len(node.inputs) > 3 and node.inputs[3].name:
                raise NotApplicable(f"{where}: padding with explicit axes is not supported")
        else:
            raise NotApplicable(f"{where}: its pads are computed")
        rank = len(pads) // 2
        if shape is not None and len(shape) != rank:
            raise NotApplicable(f"{where}: unexpected pads length")
        if pads[slot.axis] or pads[slot.axis + rank]:
            raise NotApplicable(f"{where} pads the channel axis")
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant" and value != 0.0:
            self.blocker(node, slot.space)
        self.through(node, slot, tensor)

    def resize(self, node: gs.Node, slot: Slot, tensor: gs.Tensor) -> None:
        where = f"{node.op} '{node.name}'"
        if "scales" in node.attrs:
            scales = [float(s) for s in node.attrs["scales"]]
            if scales[slot.axis] != 1.0:
                raise NotApplicable(f"{where} resizes the channel axis")
            self.through(node, slot, tensor)
            return
        scale_index = 1 if node.op == "Upsample" or self.graph.opset < 11 else 2
        scales = node.inputs[scale_index] if len(node.inputs) > scale_index else None
        sizes = node.inputs[3] if node.op == "Resize" and len(node.inputs) > 3 else None
        if scales is not None and scales.name and isinstance(scales, gs.Constant) and scales.values.size:
            if float(np.asarray(scales.values).reshape(-1)[slot.axis]) != 1.0:
                raise NotApplicable(f"{where} resizes the channel axis")
        elif sizes is not None and isinstance(sizes, gs.Constant) and sizes.values.size:
            if "axes" in node.attrs:
                raise NotApplicable(f"{where}: sizes with explicit axes are not supported")
            self.result.shape_fixes.append(ShapeFix(node.name, 3, slot.axis, node.outputs[0].name, slot.axis))
        else:
            raise NotApplicable(f"{where}: its scales or sizes are computed")
        self.through(node, slot, tensor)

    def layer(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, backward: bool) -> None:
        where = f"{node.op} '{node.name}'"
        space = self.space(slot.space)
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant):
            if tensor is not node.inputs[0] or node.op != "MatMul":
                raise NotApplicable(f"{where}: its weight is computed, cannot widen it")
            raise NotApplicable(f"{where} multiplies two computed tensors; cannot widen them")
        if tensor is weight:
            raise NotApplicable(f"{where}: the channels reach its weight input")
        others = [n for n in weight.outputs if n is not node]
        if others:
            raise NotApplicable(f"{where}: its weight '{weight.name}' is shared with '{others[0].name}'")
        wshape = weight.values.shape
        out_shape = _shape(self.shapes, node.outputs[0])
        if node.op == "Conv" and self.is_depthwise(node, wshape):
            self.depthwise(node, slot, tensor, wshape, backward)
            return
        if backward or tensor is node.outputs[0]:
            self.producer(node, slot, wshape, out_shape)
            return
        if tensor is not node.inputs[0]:
            raise NotApplicable(f"{where}: the channels reach its input '{tensor.name}', which is not its data input")
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)) or slot.axis != 1:
                raise NotApplicable(f"{where} reads the channels on its transposed side")
            axis = 1 if int(node.attrs.get("transB", 0)) else 0
            self.result.consumers.append(Consumer(node.name, node.op, slot, axis, slot.offset, slot.block))
        elif node.op == "MatMul":
            rank = len(_shape(self.shapes, tensor) or ()) or None
            if rank is None or slot.axis != rank - 1 or len(wshape) < 2:
                raise NotApplicable(f"{where} reads the channels on an axis it does not contract")
            self.result.consumers.append(Consumer(node.name, node.op, slot, len(wshape) - 2, slot.offset, slot.block))
        elif node.op == "ConvTranspose":
            if slot.axis != 1 or int(node.attrs.get("group", 1)) != 1:
                raise NotApplicable(f"{where}: grouped transposed convolutions are not supported")
            self.result.consumers.append(Consumer(node.name, node.op, slot, 0, slot.offset, slot.block))
        else:
            self.conv_consumer(node, slot, tensor, wshape)
        del space

    def producer(self, node: gs.Node, slot: Slot, wshape: tuple[int, ...], out_shape) -> None:
        where = f"{node.op} '{node.name}'"
        space = self.space(slot.space)
        if space.derived_from is not None:
            raise NotApplicable(f"{where} writes into the new groups of grouped Conv '{space.derived_from}'")
        if slot.offset != 0 or slot.block != 1:
            raise NotApplicable(f"{where}: only part of its outputs carry the channels")
        groups = 1
        ungroup = 0
        if node.op == "Conv":
            axis = 0
            groups = int(node.attrs.get("group", 1))
            if slot.axis != 1:
                raise NotApplicable(f"{where}: the channels are not its output channels")
            if groups > 1 and node.name in self.ungroup:
                groups, ungroup = 1, groups  # made dense: its new filters read every input channel
            elif groups > 1:
                per_group = wshape[0] // groups
                k = space.added // groups if space.added % groups == 0 else 0
                expected = tuple(((g + 1) * per_group, k) for g in range(groups))
                if not k or space.inserts != expected:
                    raise NotApplicable(
                        f"{where} has {groups} groups: each group must grow equally (width a multiple of {groups})"
                    )
        elif node.op == "ConvTranspose":
            axis = 1
            if int(node.attrs.get("group", 1)) != 1 or slot.axis != 1:
                raise NotApplicable(f"{where}: grouped transposed convolutions are not supported")
        elif node.op == "Gemm":
            axis = 0 if int(node.attrs.get("transB", 0)) else 1
            if slot.axis != 1:
                raise NotApplicable(f"{where}: the channels are not its output units")
        else:
            axis = len(wshape) - 1
            rank = len(out_shape) if out_shape else None
            if rank is None or slot.axis != rank - 1:
                raise NotApplicable(f"{where}: the channels are not its output columns")
        if wshape[axis] != space.old:
            raise NotApplicable(f"{where}: its {wshape[axis]} outputs do not match the {space.old} channels")
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            raise NotApplicable(f"{where}: its bias '{node.inputs[2].name}' is computed")
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            bias = node.inputs[2]
            others = [n for n in bias.outputs if n is not node]
            if others:
                raise NotApplicable(f"{where}: its bias '{bias.name}' is shared with '{others[0].name}'")
        entry = Producer(node.name, node.op, slot, axis, groups, ungroup)
        if entry not in self.result.producers:
            self.result.producers.append(entry)

    def conv_consumer(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, wshape: tuple[int, ...]) -> None:
        where = f"Conv '{node.name}'"
        if slot.axis != 1:
            raise NotApplicable(f"{where} reads the channels on axis {slot.axis}, not its channel axis")
        groups = int(node.attrs.get("group", 1))
        space = self.space(slot.space)
        if groups == 1:
            self.result.consumers.append(Consumer(node.name, node.op, slot, 1, slot.offset, slot.block))
            return
        in_shape = _shape(self.shapes, tensor)
        cin = in_shape[1] if in_shape else None
        per_in = wshape[1]
        per_out = wshape[0] // groups
        if cin is None or cin != groups * per_in:
            raise NotApplicable(f"{where}: the size of its input channels is unknown")
        positions = [(slot.offset + p * slot.block, c * slot.block) for p, c in space.inserts]
        if len(positions) == groups and all(c == positions[0][1] for _, c in positions):
            rel = [at - g * per_in for g, (at, _) in enumerate(positions)]
            if all(0 < r <= per_in for r in rel) and len(set(rel)) == 1:
                # every group grows by the same channels at the same place: its weight grows on axis 1
                self.result.consumers.append(Consumer(node.name, node.op, slot, 1, slot.offset, slot.block))
                return
        if all(at % per_in == 0 and c % per_in == 0 for at, c in positions):
            if any(g.node == node.name for g in self.result.groups):
                raise NotApplicable(f"{where}: two widened inputs would give it new groups")
            new_filters = tuple((at // per_in * per_out, c // per_in * per_out) for at, c in positions)
            derived = Space(len(self.result.spaces), wshape[0], new_filters, derived_from=node.name)
            self.result.spaces.append(derived)
            self.result.groups.append(GroupChange(node.name, sum(c for _, c in positions) // per_in, derived.id,
                                                  new_filters))
            if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
                raise NotApplicable(f"{where}: its bias is computed")
            self.add_slot(node.outputs[0], 1, 0, 1, derived.id, where)
            return
        raise NotApplicable(
            f"{where} has {groups} groups of {per_in} channels: the new channels fit neither its groups nor new ones"
        )

    def is_depthwise(self, node: gs.Node, wshape: tuple[int, ...]) -> bool:
        groups = int(node.attrs.get("group", 1))
        in_shape = _shape(self.shapes, node.inputs[0])
        return groups > 1 and wshape[1] == 1 and in_shape is not None and in_shape[1] == groups

    def depthwise(self, node: gs.Node, slot: Slot, tensor: gs.Tensor, wshape: tuple[int, ...],
                  backward: bool) -> None:
        """A depthwise conv carries each channel to its own `m` outputs: the space goes through it."""
        where = f"Conv '{node.name}'"
        if slot.axis != 1:
            raise NotApplicable(f"{where} reads the channels on axis {slot.axis}, not its channel axis")
        m = wshape[0] // int(node.attrs["group"])
        if backward:
            if slot.offset % m or slot.block % m:
                raise NotApplicable(f"{where}: the channels split its depthwise filters")
            inner = Slot(node.inputs[0].name, 1, slot.offset // m, slot.block // m, slot.space)
        else:
            inner = slot
        if (node.name, inner) in self.depthwise_done:
            return
        self.depthwise_done.add((node.name, inner))
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            raise NotApplicable(f"{where}: its bias is computed")
        self.result.groups.append(GroupChange(node.name, self.space(slot.space).added * inner.block))
        self.add_param(node, 1, 0, inner.offset * m, inner.block * m, slot.space, "filter")
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            self.add_param(node, 2, 0, inner.offset * m, inner.block * m, slot.space, "bias")
        self.add_slot(node.inputs[0], 1, inner.offset, inner.block, slot.space, where)
        self.add_slot(node.outputs[0], 1, inner.offset * m, inner.block * m, slot.space, where)

    @property
    def graph_tensors(self) -> dict[str, gs.Tensor]:
        if not hasattr(self, "_tensors"):
            self._tensors = self.graph.tensors()
        return self._tensors


def analyze(graph: gs.Graph, tensor: str, axis: int, inserts: Sequence[tuple[int, int]], shapes: Shapes, *,
            old: int | None = None, offset: int = 0, block: int = 1, backward: bool = True,
            ungroup: Sequence[str] = ()) -> Coupling:
    """Follow channel axis `axis` of `tensor` through `graph`; see the module docstring.

    `inserts` are the new channels, `(pos, count)` with `pos` in old channels; `old` is the number
    of channels (default: the tensor's size on `axis`). With `backward=False` the analysis does not
    go up into producers (for a new tensor spliced in, e.g. a concatenated skip). The grouped
    Convs named in `ungroup` are treated as dense producers (the pass rewrites them with
    block-diagonal weights and group 1), so new channels may go after all the old ones. Raises
    NotApplicable naming the op in the way when the function cannot be preserved.
    """
    analysis = _Analysis(graph, shapes, allow_backward=backward, ungroup=frozenset(ungroup))
    tensors = analysis.graph_tensors
    if tensor not in tensors:
        raise NotApplicable(f"no tensor '{tensor}' in the graph")
    t = tensors[tensor]
    if old is None:
        shape = _shape(shapes, t)
        if shape is None or shape[axis] is None:
            raise NotApplicable(f"the channel count of '{tensor}' is unknown")
        old = int(shape[axis]) // block
    space = Space(0, int(old), tuple((int(p), int(c)) for p, c in inserts))
    if any(not 0 <= p <= old or c <= 0 for p, c in space.inserts):
        raise NotApplicable(f"insertions {list(space.inserts)} do not fit {old} channels")
    analysis.result.spaces.append(space)
    analysis.add_slot(t, axis, offset, block, 0, f"'{tensor}'")
    return analysis.run()


def apply_shape_fixes(graph: gs.Graph, coupling: Coupling) -> None:
    """After the channels grew: grow the constants that spell a shape, and forget stale shapes.

    Shared by every pass that adds channels (widen, concat-skip) so the bookkeeping lives once.
    """
    nodes = {node.name: node for node in graph.nodes}
    for fix in coupling.shape_fixes:
        node = nodes[fix.node]
        shape = mgraph.values(node.inputs[fix.index]).copy()
        shape[fix.position] += coupling.added(fix.tensor, fix.axis)
        mgraph.set_input_constant(node, fix.index, shape)
    tensors = graph.tensors()
    for name in coupling.tensors:
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable):
            tensor.shape = None
