"""Channel rules of the ops that act per channel: activations, broadcasts, norms, pools, reductions and layers.

Each rule is registered for its op types in `onnxmorph.analysis.coupling.RULES`; see that module for the
vocabulary (spaces, slots, visits) and `onnxmorph.analysis.channel_layout` for the ops that move channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis.coupling import (
    LAYERS as LAYER_OPS,
)
from onnxmorph.analysis.coupling import (
    Consumer,
    GroupChange,
    Misfit,
    Producer,
    Slot,
    Visit,
    constant_ints,
    insert_positions,
    rule,
)

if TYPE_CHECKING:  # the traversal imports this module
    from onnxmorph.analysis.channels import Analysis
from onnxmorph.errors import NotApplicable

# Ops applied channel by channel with one data input (index 0); other inputs are constants.
UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Softsign", "Identity", "Abs", "Neg", "Erf", "Gelu",
    "HardSwish", "Mish", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "ThresholdedRelu", "Dropout", "Shrink",
)
UNARY_NOT_ZERO = ("Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Sqrt", "Reciprocal", "Cos", "IsNaN", "IsInf",
                  "Not")
# Elementwise ops with numpy broadcasting between any number of inputs.
ELEMENTWISE = ("Add", "Sub", "Mul", "Sum", "Max", "Min", "Mean", "PRelu")
ROLES = {"Add": "shift", "Sub": "shift", "Mul": "scale", "Div": "scale", "PRelu": "slope", "Pow": "scale"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_KEEPS_ZERO = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
                     "ReduceProd")
REDUCE_OTHER = ("ReduceLogSum", "ReduceLogSumExp")
UNIFORM_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin")  # unchanged over an axis whose channels are tiled
# opsets from which each reduction takes its axes as an input instead of an attribute
AXES_INPUT_FROM = {"ReduceSum": 13}


def _clip_blocks_zero(v: Visit) -> bool:
    node = v.node
    for k in (1, 2):
        if len(node.inputs) > k and node.inputs[k].name and not isinstance(node.inputs[k], gs.Constant):
            raise NotApplicable(f"{v.where}: its bound '{node.inputs[k].name}' is computed")
        if len(node.inputs) > k and isinstance(node.inputs[k], gs.Constant) and node.inputs[k].values.size > 1:
            raise NotApplicable(f"{v.where}: its bound '{node.inputs[k].name}' is not a scalar")
    lo, hi = node.attrs.get("min", None), node.attrs.get("max", None)
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.size:
        lo = float(np.asarray(node.inputs[1].values).reshape(-1)[0])
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.size:
        hi = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
    return (lo is not None and lo > 0) or (hi is not None and hi < 0)


@rule(*UNARY, "Clip")
@rule(*UNARY_NOT_ZERO, keeps_zero=False)
def unary(a: Analysis, v: Visit) -> None:
    """One data input, the others constants: the channels go straight through."""
    if v.node.op == "Clip" and _clip_blocks_zero(v):
        a.blocker(v.node, v.slot.space)
    if v.node.op != "Dropout":
        for t in v.node.inputs[1:]:
            if t.name and not isinstance(t, gs.Constant):
                raise NotApplicable(f"{v.where}: its input '{t.name}' is computed")
    extra = a.data_outputs(v.node)[1:]
    if extra:
        raise NotApplicable(f"{v.where}: its mask output '{extra[0].name}' is used (not supported)")
    if v.tensor is not v.node.inputs[0] and v.tensor is not v.node.outputs[0]:
        raise NotApplicable(f"{v.where}: the channels reach its parameter '{v.tensor.name}'")
    a.through(v)


@rule(*ELEMENTWISE, "Div", "Pow")
@rule("Where", keeps_zero=False)
def broadcast(a: Analysis, v: Visit) -> None:
    """Numpy broadcasting: every input with the channel axis (not of size 1) carries the slot."""
    node, slot = v.node, v.slot
    full = a.shape(v.tensor)
    rank = len(full) if full else slot.axis + 1
    from_right = rank - slot.axis
    size = full[slot.axis] if full else None
    exponent = node.inputs[1] if node.op == "Pow" else None
    if node.op in ("Div", "Pow") and any(v.tensor is t for t in node.inputs[1:]) or exponent is not None and not (
            isinstance(exponent, gs.Constant) and np.all(np.asarray(exponent.values) > 0)):
        a.blocker(node, slot.space)  # 1/0 and c**0 are not 0
    for k, t in enumerate(node.inputs):
        if t is v.tensor or not t.name:
            continue
        shape = a.shape(t)
        r = len(shape) if shape is not None else rank
        axis = r - from_right
        # an operand of size 1 on the channel axis broadcasts (a rotary table over the heads), also when the axis
        # has one channel (one key/value head): widened, it stays a broadcast
        unit = size == 1 and a.space(slot.space).old * slot.block == 1 and not _from_layer(a, t)
        if axis < 0 or (shape[axis] if shape is not None else size) == 1 and (size != 1 or unit):
            continue
        other = shape[axis] if shape is not None else None
        if size == 1 and other is not None and other > 1 and not v.backward and v.tensor in node.inputs:
            raise NotApplicable(f"{v.where}: the one channel of '{v.tensor.name}' is broadcast over the {other} of "
                                f"'{t.name}' (a gate): widening it cannot preserve the function")
        if isinstance(t, gs.Constant) and node.op in ("Max", "Min", "Mean", "Sum"):
            a.blocker(node, slot.space)
        a.carry(node, k, axis, slot.offset, slot.block, slot.space, ROLES.get(node.op, "copy-only"))
    out = node.outputs[0]
    if out is not v.tensor:
        shape = a.shape(out)
        a.add_slot(out, (len(shape) if shape is not None else rank) - from_right, slot.offset, slot.block,
                   slot.space, v.where)


def _from_layer(a: Analysis, tensor: gs.Tensor) -> bool:
    """Whether `tensor` is computed from a layer's output (a projection's heads), not only from inputs and constants
    (a rotary table, a mask): a unit axis of the former is a channel, of the latter a broadcast."""
    key = ("from_layer", tensor.name)
    if key not in a.memo:
        found, stack, seen = False, [tensor], set()
        while stack and not found:
            t = stack.pop()
            node = t.inputs[0] if t.inputs else None
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            found = node.op in LAYER_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)
            stack += [i for i in node.inputs if not isinstance(i, gs.Constant)]
        a.memo[key] = found
    return bool(a.memo[key])


@rule(*NORMS)
def norm(a: Analysis, v: Visit) -> None:
    """Batch and instance norms: per-channel statistics on axis 1 grow with the channels."""
    node, slot = v.node, v.slot
    if slot.axis != 1 or v.tensor is not node.inputs[0] and v.tensor is not node.outputs[0]:
        raise NotApplicable(f"{v.where} normalises axis 1, the channels are on axis {slot.axis}")
    for k in NORMS[node.op]:
        if len(node.inputs) <= k or not isinstance(node.inputs[k], gs.Constant):
            raise NotApplicable(f"{v.where}: its parameter {k} is not a constant")
        role = {1: "scale", 2: "shift", 3: "shift", 4: "var"}[k]
        a.add_param(node, k, 0, slot.offset, slot.block, slot.space, role)
    a.through(v)


def covers_axis(a: Analysis, v: Visit) -> bool:
    """Whether the slot is the whole of its tensor's axis (a stream widened as a whole, e.g. a hidden size)."""
    shape = a.shape(v.tensor)
    size = shape[v.slot.axis] if shape else None
    return v.slot.offset == 0 and v.slot.block == 1 and size is not None and a.space(v.slot.space).old == size


@rule("LayerNormalization", "RMSNormalization", keeps_zero=False)
def layer_norm(a: Analysis, v: Visit) -> None:
    """Normalises the axes from `axis` on: the channels pass when they are not among them.

    When the channels are the one normalised axis, the norm is exact if the stream is tiled (every
    channel copied equally: same mean, variance and mean square) with gamma and beta copied alike.
    """
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", -1)) % rank if rank else None
    if rank is None or v.tensor is not node.inputs[0] and v.tensor is not node.outputs[0]:
        raise NotApplicable(f"{v.where} normalises over the widened axis: widening '{v.tensor.name}' cannot "
                            "preserve the function")
    if slot.axis < axis:
        a.through(v)
        return
    params = [k for k in (1, 2) if len(node.inputs) > k and node.inputs[k].name]
    if axis != rank - 1 or not covers_axis(a, v) or any(not isinstance(node.inputs[k], gs.Constant) for k in params):
        raise NotApplicable(f"{v.where} normalises over the widened axis: widening '{v.tensor.name}' cannot "
                            "preserve the function")
    a.uniform(node)
    for k in params:
        a.add_param(node, k, -1, 0, 1, slot.space, "norm-scale" if k == 1 else "shift")
    a.through(v)


SKIP_NORMS = {"SkipLayerNormalization": {2: "norm-scale", 3: "shift", 4: "shift"},
              "SkipSimplifiedLayerNormalization": {2: "norm-scale", 3: "shift"}}


@rule(*SKIP_NORMS, keeps_zero=False, domain="com.microsoft")
def skip_norm(a: Analysis, v: Visit) -> None:
    """onnxruntime's fused residual add and norm over the last axis: output 0 the norm, output 3 the sum."""
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    if rank is None or any(v.tensor is t for t in node.inputs[2:]):
        raise NotApplicable(f"{v.where}: the channels reach its parameters or its rank is unknown")
    used = [t.name for t in node.outputs[1:3] if t.outputs or t.name in a.outputs]
    if used:
        raise NotApplicable(f"{v.where}: its statistics output '{used[0]}' is used (not supported)")
    if slot.axis == rank - 1:
        if not covers_axis(a, v):
            raise NotApplicable(f"{v.where} normalises over the widened axis: widening '{v.tensor.name}' cannot "
                                "preserve the function")
        a.uniform(node)
        for k, role in SKIP_NORMS[node.op].items():
            if len(node.inputs) > k and node.inputs[k].name:
                if not isinstance(node.inputs[k], gs.Constant):
                    raise NotApplicable(f"{v.where}: its parameter '{node.inputs[k].name}' is computed")
                a.add_param(node, k, -1, 0, 1, slot.space, role)
    for k in (0, 1):
        if node.inputs[k] is not v.tensor:
            a.carry(node, k, slot.axis, slot.offset, slot.block, slot.space)
    for k in (0, 3):
        t = node.outputs[k] if len(node.outputs) > k else None
        if t is not None and t is not v.tensor and (t.outputs or t.name in a.outputs):
            a.add_slot(t, slot.axis, slot.offset, slot.block, slot.space, v.where)


@rule(*POOLS)
def pool(a: Analysis, v: Visit) -> None:
    if v.slot.axis != 1:
        raise NotApplicable(f"{v.where} pools over the widened axis {v.slot.axis}")
    a.through(v)


@rule("LRN")
def lrn(a: Analysis, v: Visit) -> None:
    """LRN sums a window of neighbouring channels by position.

    New channels are harmless only after the last old channel (in between they would shift the
    old channels' windows), and the first ceil((size - 1) / 2) of them, which the last old
    channels' windows reach, must be exactly 0.
    """
    node, slot = v.node, v.slot
    if slot.axis != 1:
        raise NotApplicable(f"LRN '{node.name}' works on axis 1, the channels are on axis {slot.axis}")
    shape = a.shape(v.tensor)
    size = shape[1] if shape else None
    for at, _count in insert_positions(a.space(slot.space), slot):
        if size is None or at != size:
            raise NotApplicable(f"LRN '{node.name}' sums neighbouring channels: new channels would sit between old "
                                f"ones of '{v.tensor.name}' and change their sums")
    reach = int(node.attrs.get("size", 1)) // 2  # ceil((size - 1) / 2)
    guard = -(-reach // slot.block)
    a.result.lrn_guard[slot.space] = max(a.result.lrn_guard.get(slot.space, 0), guard)
    if node.name not in a.result.lrn:
        a.result.lrn.append(node.name)
    a.through(v)


@rule("Softmax", "LogSoftmax", "Hardmax", keeps_zero=False)
def softmax(a: Analysis, v: Visit) -> None:
    """Exact when the softmax runs over other axes than the channels."""
    rank = a.rank(v.tensor)
    opset = a.graph.opset
    axis = int(v.node.attrs.get("axis", -1 if opset >= 13 else 1))
    if rank is not None:
        axis %= rank
        covers = v.slot.axis == axis if opset >= 13 else v.slot.axis >= axis
        if not covers:
            a.through(v)
            return
    raise NotApplicable(f"{v.where} mixes the channels of '{v.tensor.name}': it cannot be preserved")


@rule("Size", "GroupNormalization", "ArgMax", "ArgMin", "TopK", "NonZero", keeps_zero=False)
def refused(a: Analysis, v: Visit) -> None:
    what = "reads the channel count" if v.node.op == "Size" else "mixes the channels"
    raise NotApplicable(f"{v.where} {what}: widening '{v.tensor.name}' cannot preserve the function")


# ---------------------------------------------------------------------------- reductions


def reduce_axes(a: Analysis, v: Visit, rank: int) -> list[int]:
    """The reduced axes of a Reduce* node (attribute or input), normalised; all axes when none are given."""
    node = v.node
    from_input = a.graph.opset >= AXES_INPUT_FROM.get(node.op, 18)
    axes = constant_ints(node, 1) if from_input else constant_ints(node, 99, "axes")
    if from_input and len(node.inputs) > 1 and node.inputs[1].name and axes is None:
        raise NotApplicable(f"{v.where}: its axes are computed, cannot tell whether it reduces the channels")
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted({x % rank for x in axes})


@rule(*REDUCE_KEEPS_ZERO)
@rule(*REDUCE_OTHER, keeps_zero=False)
def reduce(a: Analysis, v: Visit) -> None:
    """Reduce* over other axes than the channels (global pooling, squeeze-and-excitation) keeps them."""
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    if rank is None:
        raise NotApplicable(f"{v.where}: the rank of its input is unknown, cannot follow the channels")
    axes = reduce_axes(a, v, rank)
    kept = [x for x in range(rank) if x not in axes]
    keepdims = bool(int(node.attrs.get("keepdims", 1)))
    if not v.backward:
        if v.tensor is not node.inputs[0]:
            raise NotApplicable(f"{v.where}: the channels reach its axes input")
        if slot.axis in axes and node.op in UNIFORM_REDUCE and covers_axis(a, v):
            a.uniform(node)  # the mean (max, min) over a tiled axis is the old one: nothing widens after it
            return
        if slot.axis in axes and a.space(slot.space).kind in ("heads", "fold", "part"):
            raise NotApplicable(f"{v.where} reduces over all the heads of '{v.tensor.name}' (a norm over a "
                                "projection's whole width, as a q/k norm across heads): new heads would change its "
                                "statistics, it cannot be preserved")
        if slot.axis in axes:
            raise NotApplicable(f"{v.where} reduces over the channel axis of '{v.tensor.name}': it cannot be "
                                "preserved")
        out_axis = slot.axis if keepdims else kept.index(slot.axis)
        a.add_slot(node.outputs[0], out_axis, slot.offset, slot.block, slot.space, v.where)
        return
    in_axis = slot.axis if keepdims else kept[slot.axis]
    if in_axis in axes:
        raise NotApplicable(f"{v.where} reduces over the channel axis: it cannot be preserved")
    a.carry(node, 0, in_axis, slot.offset, slot.block, slot.space)


# ---------------------------------------------------------------------------- layers


def _shared(what: str, where: str, tensor: gs.Tensor, node: gs.Node) -> None:
    others = [n for n in tensor.outputs if n is not node]
    if others:
        raise NotApplicable(f"{where}: its {what} '{tensor.name}' is shared with '{others[0].name}'")


def _check_bias(node: gs.Node, where: str) -> None:
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        raise NotApplicable(f"{where}: its bias '{node.inputs[2].name}' is computed")
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        _shared("bias", where, node.inputs[2], node)


def is_depthwise(a: Analysis, node: gs.Node, wshape: tuple[int, ...]) -> bool:
    groups = int(node.attrs.get("group", 1))
    in_shape = a.shape(node.inputs[0])
    return groups > 1 and wshape[1] == 1 and in_shape is not None and in_shape[1] == groups


@rule("Conv", "ConvTranspose", "Gemm", "MatMul")
def layer(a: Analysis, v: Visit) -> None:
    """A layer with a constant weight: the channels end here (its outputs: producer; its input: consumer)."""
    node, where = v.node, v.where
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        if node.op == "MatMul":
            batched_matmul(a, v)
            return
        raise NotApplicable(f"{where}: its weight is computed, cannot widen it")
    if v.tensor is weight:
        raise NotApplicable(f"{where}: the channels reach its weight input")
    _shared("weight", where, weight, node)
    wshape = tuple(weight.shape)
    if node.op == "Conv" and is_depthwise(a, node, wshape):
        depthwise(a, v, wshape)
    elif v.backward or v.tensor is node.outputs[0]:
        producer(a, v, wshape)
    elif v.tensor is not node.inputs[0]:
        raise NotApplicable(f"{where}: the channels reach its input '{v.tensor.name}', which is not its data input")
    elif node.op == "Conv":
        conv_consumer(a, v, wshape)
    else:
        consumer(a, v, wshape)


def consumer(a: Analysis, v: Visit, wshape: tuple[int, ...]) -> None:
    node, slot = v.node, v.slot
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or slot.axis != 1:
            raise NotApplicable(f"{v.where} reads the channels on its transposed side")
        axis = 1 if int(node.attrs.get("transB", 0)) else 0
    elif node.op == "MatMul":
        rank = a.rank(v.tensor)
        if rank is None or slot.axis != rank - 1 or len(wshape) < 2:
            raise NotApplicable(f"{v.where} reads the channels on an axis it does not contract")
        axis = len(wshape) - 2
    else:
        if slot.axis != 1 or int(node.attrs.get("group", 1)) != 1:
            raise NotApplicable(f"{v.where}: grouped transposed convolutions are not supported")
        axis = 0
    a.result.consumers.append(Consumer(node.name, node.op, slot, axis, slot.offset, slot.block))


def _group_growth(a: Analysis, node: gs.Node, where: str, groups: int, per_group: int, space_id: int) -> None:
    space = a.space(space_id)
    k = space.added // groups if space.added % groups == 0 else 0
    expected = tuple(((g + 1) * per_group, k) for g in range(groups))
    if k and space.inserts != expected:
        raise Misfit(f"{where} has {groups} groups: its new channels must sit at the end of each group",
                     space_id, expected)
    if not k:
        old = space.old
        lower, upper = old + max(space.added // groups, 1) * groups, old + math.ceil(space.added / groups) * groups
        near = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise NotApplicable(f"{where} has {groups} groups: each group must grow equally (width a multiple of "
                            f"{groups}, e.g. {near})")


def producer(a: Analysis, v: Visit, wshape: tuple[int, ...]) -> None:
    node, slot, where = v.node, v.slot, v.where
    space = a.space(slot.space)
    if space.kind == "groups":
        raise NotApplicable(f"{where} writes into the new groups of grouped Conv '{space.derived_from}'")
    if slot.offset != 0 or slot.block != 1 and (node.op not in ("MatMul", "Gemm") or space.kind == "groups"):
        raise NotApplicable(f"{where}: only part of its outputs carry the channels")
    groups, ungroup = 1, 0
    if node.op == "Conv":
        axis = 0
        groups = int(node.attrs.get("group", 1))
        if slot.axis != 1:
            raise NotApplicable(f"{where}: the channels are not its output channels")
        if groups > 1 and node.name in a.ungroup:
            groups, ungroup = 1, groups  # made dense: its new filters read every input channel
        elif groups > 1:
            _group_growth(a, node, where, groups, wshape[0] // groups, slot.space)
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
        rank = a.rank(node.outputs[0])
        if rank is None or slot.axis != rank - 1:
            raise NotApplicable(f"{where}: the channels are not its output columns")
    if wshape[axis] != space.old * slot.block:
        raise NotApplicable(f"{where}: its {wshape[axis]} outputs do not match the {space.old} channels")
    _check_bias(node, where)
    entry = Producer(node.name, node.op, slot, axis, groups, ungroup)
    if entry not in a.result.producers:
        a.result.producers.append(entry)


def _spread(slot: Slot, old_entries: int, groups: int, per_in: int, added: int) -> list[tuple[int, int]] | None:
    """The placement (in space channels) that gives every group of a grouped reader the same new channels."""
    if slot.offset != 0 or old_entries != groups * per_in or added % (groups * slot.block) or per_in % slot.block:
        return None
    return [((g + 1) * per_in // slot.block, added // groups // slot.block) for g in range(groups)]


def conv_consumer(a: Analysis, v: Visit, wshape: tuple[int, ...]) -> None:
    """A Conv reading the channels: dense, grouped with every group growing alike, or new whole groups."""
    node, slot, where = v.node, v.slot, f"Conv '{v.node.name}'"
    if slot.axis != 1:
        raise NotApplicable(f"{where} reads the channels on axis {slot.axis}, not its channel axis")
    groups = int(node.attrs.get("group", 1))
    if groups == 1:
        a.result.consumers.append(Consumer(node.name, node.op, slot, 1, slot.offset, slot.block))
        return
    in_shape = a.shape(v.tensor)
    cin = in_shape[1] if in_shape else None
    per_in = wshape[1]
    if cin is None or cin != groups * per_in:
        raise NotApplicable(f"{where}: the size of its input channels is unknown")
    space = a.space(slot.space)
    positions = insert_positions(space, slot)
    if len(positions) == groups and all(c == positions[0][1] for _, c in positions):
        rel = [at - g * per_in for g, (at, _) in enumerate(positions)]
        if all(0 < r <= per_in for r in rel) and len(set(rel)) == 1:
            # every group grows by the same channels at the same place: its weight grows on axis 1
            a.result.consumers.append(Consumer(node.name, node.op, slot, 1, slot.offset, slot.block))
            return
    if all(at % per_in == 0 and c % per_in == 0 for at, c in positions):
        spread = _spread(slot, space.old * slot.block, groups, per_in, space.added * slot.block)
        if slot.space == 0 and spread and a.result.for_copies is None:
            a.result.for_copies = tuple(spread)
        new_groups(a, v, wshape, positions, per_in)
        return
    added = space.added * slot.block
    lower, upper = added // per_in * per_in, -(-added // per_in) * per_in
    widths = [space.old + w // slot.block for w in (lower, upper) if w and w % slot.block == 0]
    near = f" (new whole groups: width {' or '.join(map(str, widths))})" if widths else ""
    raise Misfit(f"{where} has {groups} groups of {per_in} channels: the new channels fit neither its groups nor new "
                 f"ones{near}", slot.space, _spread(slot, space.old * slot.block, groups, per_in, added))


def new_groups(a: Analysis, v: Visit, wshape: tuple[int, ...], positions: list[tuple[int, int]], per_in: int) -> None:
    """New channels that fill whole groups of a grouped Conv: it gets new groups, whose outputs are derived."""
    node, where = v.node, f"Conv '{v.node.name}'"
    per_out = wshape[0] // int(node.attrs.get("group", 1))
    if any(g.node == node.name for g in a.result.groups):
        raise NotApplicable(f"{where}: two widened inputs would give it new groups")
    new_filters = tuple((at // per_in * per_out, c // per_in * per_out) for at, c in positions)
    derived = a.derive(node, wshape[0], new_filters, "groups")
    a.result.groups.append(GroupChange(node.name, sum(c for _, c in positions) // per_in, derived.id, new_filters))
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        raise NotApplicable(f"{where}: its bias is computed")
    a.add_slot(node.outputs[0], 1, 0, 1, derived.id, where)


def depthwise(a: Analysis, v: Visit, wshape: tuple[int, ...]) -> None:
    """A depthwise conv carries each channel to its own `m` outputs: the space goes through it."""
    node, slot, where = v.node, v.slot, f"Conv '{v.node.name}'"
    if slot.axis != 1:
        raise NotApplicable(f"{where} reads the channels on axis {slot.axis}, not its channel axis")
    m = wshape[0] // int(node.attrs["group"])
    if v.backward:
        if slot.offset % m or slot.block % m:
            raise NotApplicable(f"{where}: the channels split its depthwise filters")
        inner = Slot(node.inputs[0].name, 1, slot.offset // m, slot.block // m, slot.space)
    else:
        inner = slot
    key = ("depthwise", node.name, inner)
    if key in a.memo:
        return
    a.memo[key] = True
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        raise NotApplicable(f"{where}: its bias is computed")
    a.result.groups.append(GroupChange(node.name, a.space(slot.space).added * inner.block))
    a.add_param(node, 1, 0, inner.offset * m, inner.block * m, slot.space, "filter")
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        a.add_param(node, 2, 0, inner.offset * m, inner.block * m, slot.space, "bias")
    a.add_slot(node.inputs[0], 1, inner.offset, inner.block, slot.space, where)
    a.add_slot(node.outputs[0], 1, inner.offset * m, inner.block * m, slot.space, where)


def batched_matmul(a: Analysis, v: Visit) -> None:
    """A product of two computed tensors (attention): channels on a batch axis (heads) pass to both and the result."""
    node, slot = v.node, v.slot
    tensors = [node.inputs[0], node.inputs[1], node.outputs[0]]
    ranks = [a.rank(t) for t in tensors]
    k = next(i for i, t in enumerate(tensors) if t is v.tensor)
    if None in ranks:
        raise NotApplicable(f"{v.where}: the ranks around it are unknown, cannot follow the channels")
    from_right = ranks[k] - slot.axis
    if from_right <= 2:
        raise NotApplicable(f"{v.where} multiplies two computed tensors; cannot widen them")
    for i, t in enumerate(tensors):
        axis = ranks[i] - from_right
        if i == k or axis < 0 or (a.shape(t) or [None] * ranks[i])[axis] == 1:
            continue
        a.carry(node, i, axis, slot.offset, slot.block, slot.space) if i < 2 else a.add_slot(
            t, axis, slot.offset, slot.block, slot.space, v.where)
