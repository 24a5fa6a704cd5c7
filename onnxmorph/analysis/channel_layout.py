"""Channel rules of the ops that move channels around: concat, reshapes, shuffles, slices, gathers, expands, pads.

Each rule is registered for its op types in `onnxmorph.analysis.coupling.RULES`; see that module for the
vocabulary (spaces, slots, visits) and `onnxmorph.analysis.channel_rules` for the per-channel ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis import shape_eval
from onnxmorph.analysis.channel_shapes import grow_computed_target
from onnxmorph.analysis.coupling import (
    Misfit,
    ShapeFix,
    Slot,
    SplitFix,
    Visit,
    constant_ints,
    insert_positions,
    map_reshape,
    rule,
)

if TYPE_CHECKING:  # the traversal imports this module
    from onnxmorph.analysis.channels import Analysis
from onnxmorph.analysis.sizes import refine_reshape
from onnxmorph.errors import NotApplicable


def _part_of(at: int, bounds: list[tuple[int, int]]) -> int:
    """Which part [start, end) an insertion at entry `at` joins: the one it ends (the first at 0)."""
    for k, (start, end) in enumerate(bounds):
        if start < at <= end or at == start == 0:
            return k
    raise NotApplicable(f"insertion at {at} is outside the parts {bounds}")


def _follow_parts(a: Analysis, v: Visit, bounds: list[tuple[int, int]], targets: list[gs.Tensor | None],
                  axis: int) -> list[int]:
    """Give each part [start, end) of the widened axis the new channels that fall in it; their counts.

    When one part holds all the slot's old channels it takes all the new ones (the slot moves
    there); otherwise each part gets a derived space with the new channels that fall in it.
    """
    slot = v.slot
    space = a.space(slot.space)
    lo, hi = slot.offset, slot.offset + space.old * slot.block
    counts = [0] * len(bounds)
    whole = next((k for k, (start, end) in enumerate(bounds) if start <= lo and hi <= end), None)
    if whole is not None:
        counts[whole] = space.added * slot.block
        if targets[whole] is not None:
            a.add_slot(targets[whole], axis, lo - bounds[whole][0], slot.block, slot.space, v.where)
        return counts
    a.copy_blocker(v.node)  # a new channel may land apart from the old one it would copy
    found: dict[int, list[tuple[int, int]]] = {}
    for at, count in insert_positions(space, slot):
        k = _part_of(at, bounds)
        counts[k] += count
        found.setdefault(k, []).append((at - bounds[k][0], count))
    for k, inserts in found.items():
        target = targets[k]
        if target is None:
            continue
        if slot.block != 1 or isinstance(target, gs.Constant):
            raise NotApplicable(f"{v.where}: the channels of '{v.tensor.name}' span several of its parts")
        derived = a.derive(v.node, bounds[k][1] - bounds[k][0], inserts, "part")
        a.add_slot(target, axis, 0, 1, derived.id, v.where)
    return counts


@rule("Concat")
def concat(a: Analysis, v: Visit) -> None:
    """Along another axis every input carries the channels (a constant one grows: a class token);
    along the channel axis each input's channels sit at its offset."""
    node, slot = v.node, v.slot
    out = node.outputs[0]
    rank = a.rank(out)
    axis = int(node.attrs.get("axis", 1))
    if rank is not None:
        axis %= rank
    if axis != slot.axis:
        for k, t in enumerate(node.inputs):
            if t is not v.tensor:
                a.carry(node, k, slot.axis, slot.offset, slot.block, slot.space)
        if out is not v.tensor:
            a.add_slot(out, slot.axis, slot.offset, slot.block, slot.space, v.where)
        return
    bounds = []
    start = 0
    for t in node.inputs:
        shape = a.shape(t)
        if shape is None or shape[axis] is None:
            raise NotApplicable(f"{v.where}: the size of '{t.name}' on the concat axis is unknown")
        bounds.append((start, start + int(shape[axis])))
        start += int(shape[axis])
    if v.backward:
        # each input that receives new channels widens; one whose new channels span several inputs splits
        _follow_parts(a, v, bounds, list(node.inputs), axis)
        return
    for k, t in enumerate(node.inputs):
        if t is v.tensor:
            a.add_slot(out, axis, bounds[k][0] + slot.offset, slot.block, slot.space, v.where)


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(a: Analysis, v: Visit) -> None:
    """The channels stay whole blocks of one axis (each owning H*W columns after a Flatten, say)."""
    node, slot = v.node, v.slot
    src, dst = (node.outputs[0], node.inputs[0]) if v.backward else (node.inputs[0], node.outputs[0])
    s_shape, d_shape = a.shape(src), a.shape(dst)
    if s_shape is None or d_shape is None:
        raise NotApplicable(f"{v.where}: the shapes around it are unknown, cannot follow the channels")
    if node.op in ("Squeeze", "Unsqueeze") and _squeeze(a, v, s_shape, d_shape):
        return
    s_shape, d_shape = refine_reshape(a, node, s_shape, d_shape, v.backward)
    if _one_head(a, v, s_shape, d_shape) and regroup(a, v, s_shape, d_shape, whole=True):
        return
    mapped = map_reshape(s_shape, d_shape, slot.axis, slot.offset, slot.block)
    if mapped is None:
        shuffled = node.op == "Reshape" and not v.backward and _shuffle_around(a, node, slot.axis) is not None
        if not shuffled and (fold(a, v, s_shape, d_shape) or regroup(a, v, s_shape, d_shape)):
            return
        if node.op == "Reshape":
            (unshuffle if v.backward else shuffle)(a, v)
            return
        raise NotApplicable(f"{v.where} splits the channel axis of '{src.name}' (e.g. a channel shuffle)")
    axis, offset, block = mapped
    if node.op == "Reshape":
        out_axis = axis if not v.backward else slot.axis
        _grow_target(a, v, out_axis, out_axis, None)
    a.add_slot(dst, axis, offset, block, slot.space, v.where)


def _squeeze(a: Analysis, v: Visit, s_shape: tuple, d_shape: tuple) -> bool:
    """An Unsqueeze or Squeeze with known axes: the channel axis moves by the unit axes inserted or removed before it
    (read from its axes, not from the sizes: a channel axis of one head has size 1 too)."""
    node, slot = v.node, v.slot
    axes = constant_ints(node, 1, "axes")
    if axes is None:
        return False
    unit_side = node.outputs[0] if node.op == "Unsqueeze" else node.inputs[0]
    rank = a.rank(unit_side)
    if rank is None or len(d_shape) != len(s_shape) + (1 if (node.op == "Unsqueeze") != v.backward else -1):
        return False
    units = sorted({x % rank for x in axes})
    kept = [x for x in range(rank) if x not in units]  # the other side's axes, in the unit side's numbering
    if (node.op == "Unsqueeze") != v.backward:  # to the side with the unit axes
        to = kept[slot.axis] if slot.axis < len(kept) else None
    else:
        to = kept.index(slot.axis) if slot.axis in kept else None
    if to is None:
        raise NotApplicable(f"{v.where} removes the channel axis of '{v.tensor.name}'")
    target = node.inputs[0] if v.backward else node.outputs[0]
    a.add_slot(target, to, slot.offset, slot.block, slot.space, v.where)
    return True


def _one_head(a: Analysis, v: Visit, s_shape: tuple, d_shape: tuple) -> bool:
    """A reshape [.., C] -> [.., 1, C] (forward; backward the reverse) of a whole channel axis growing by whole
    multiples of C: one attention head of C channels (a multi-query key or value) getting new heads, not C growing."""
    slot = v.slot
    src, dst = (s_shape, d_shape)
    ax = slot.axis
    if v.node.op != "Reshape" or slot.block != 1 or slot.offset != 0 or src[ax] is None or len(dst) != len(src) + 1 \
            or ax == 0:  # (a batch of 1 merged with the heads, [1, H, T, d] -> [H, T, d], is not one head)
        return False
    size = src[ax]
    if tuple(dst[:ax]) != tuple(src[:ax]) or tuple(dst[ax:ax + 2]) != (1, size) or tuple(dst[ax + 2:]) != tuple(
            src[ax + 1:]):
        return False
    space = a.space(slot.space)
    return space.old == size and all(at % size == 0 and c % size == 0 for at, c in insert_positions(space, slot))


def regroup(a: Analysis, v: Visit, s_shape: tuple, d_shape: tuple, whole: bool = False) -> bool:
    """A reshape that splits the channel axis into blocks of k (attention heads of size k; backwards, query heads
    merged from groups of k repeated key/value heads): when the new channels are whole blocks, the blocks are
    followed as channels (a derived space, one channel per block)."""
    slot = v.slot
    space = a.space(slot.space)
    size = s_shape[slot.axis]
    positions = insert_positions(space, slot)
    if slot.block != 1 or size is None:
        return False
    for k in ([size] if whole else range(2, size + 1)):
        if size % k or slot.offset % k or space.old % k or any(at % k or c % k for at, c in positions):
            continue
        # one head of C channels ([.., C] -> [.., 1, C]): its new heads go on the unit axis
        mapped = (slot.axis, 0, 1) if whole else map_reshape(s_shape, d_shape, slot.axis, slot.offset, k)
        if mapped is None:
            continue
        derived = a.derive(v.node, space.old // k, [((at - slot.offset) // k, c // k) for at, c in positions], "heads")
        if v.node.op == "Reshape":
            out_axis = slot.axis if v.backward else mapped[0]
            _grow_target(a, v, out_axis, out_axis, None)
        target = v.node.inputs[0] if v.backward else v.node.outputs[0]
        a.add_slot(target, mapped[0], mapped[1], mapped[2], derived.id, v.where)
        return True
    return False


def _periodic(positions: list[tuple[int, int]], repeats: int, size: int) -> list[tuple[int, int]] | None:
    """The insertions of one period when every one of `repeats` periods of `size` entries has the same ones."""
    periods: list[list[tuple[int, int]]] = [[] for _ in range(repeats)]
    for at, count in positions:
        r = max(at - 1, 0) // size
        if r >= repeats:
            return None
        periods[r].append((at - r * size, count))
    return periods[0] if periods[0] and all(p == periods[0] for p in periods) else None


def fold(a: Analysis, v: Visit, s_shape: tuple, d_shape: tuple) -> bool:
    """A reshape that merges the channel axis with axes around it ([B, H, T, d] -> [B*H, T, d], as exporters write
    attention's batched products; [B, kv, rep, T, d] -> [B*kv*rep, T, d] for grouped-query heads) or splits such an
    axis apart again: the new channels repeat in every period of the merged axis."""
    slot, ax = v.slot, v.slot.axis
    if None in s_shape or None in d_shape:
        return False
    positions = insert_positions(a.space(slot.space), slot)  # in entries: a channel may own a block of them
    grown = sum(c for _, c in positions)
    for j in range(ax + 1):
        for k in range(ax, len(s_shape)):
            if (j, k) == (ax, ax) or tuple(s_shape[:j]) != tuple(d_shape[:j]) or tuple(s_shape[k + 1:]) != tuple(
                    d_shape[j + 1:]) or d_shape[j] != int(np.prod(s_shape[j:k + 1])):
                continue
            repeats, size, inner = int(np.prod(s_shape[j:ax])), s_shape[ax], int(np.prod(s_shape[ax + 1:k + 1]))
            inserts = sorted((r * size * inner + at * inner, c * inner) for r in range(repeats) for at, c in positions)
            _fold_to(a, v, j, d_shape[j], inserts, (j, repeats * inner * grown) if not v.backward else (ax, grown))
            return True
    return _unfold(a, v, s_shape, d_shape, positions, grown)


def _unfold(a: Analysis, v: Visit, s_shape: tuple, d_shape: tuple, positions: list[tuple[int, int]],
            grown: int) -> bool:
    """The inverse of a merge: the channel axis splits into several; the one whose periods repeat the new channels
    carries them."""
    ax = v.slot.axis
    space = a.space(v.slot.space)
    if v.slot.offset != 0 or space.old * v.slot.block != s_shape[ax] or tuple(d_shape[:ax]) != tuple(s_shape[:ax]):
        return False
    for k in range(ax + 1, len(d_shape)):
        if int(np.prod(d_shape[ax:k + 1])) != s_shape[ax] or tuple(d_shape[k + 1:]) != tuple(s_shape[ax + 1:]):
            continue
        # the innermost axis whose periods all repeat the new channels; an axis an Expand repeats (the query heads
        # per key/value head of grouped-query attention) only when no other does: the heads grow, not their sharing
        candidates = sorted(reversed(range(ax, k + 1)), key=lambda c: _repeated_axis(a, v, c))
        for c in candidates:
            repeats, size, inner = int(np.prod(d_shape[ax:c])), d_shape[c], int(np.prod(d_shape[c + 1:k + 1]))
            period = _periodic(positions, repeats, size * inner)
            if period is None or any(at % inner or n % inner for at, n in period):
                continue
            period = [(at // inner, n // inner) for at, n in period]
            growth = sum(n for _, n in period)
            _fold_to(a, v, c, size, period, (c, growth) if not v.backward else (ax, grown))
            return True
    return False


def _repeated_axis(a: Analysis, v: Visit, axis: int) -> bool:
    """Whether `axis` of the reshape's split side is made by an Expand or Tile repeating a unit axis."""
    tensor = v.node.inputs[0] if v.backward else v.node.outputs[0]
    if not v.backward:
        return False
    maker = tensor.inputs[0] if tensor.inputs else None
    if maker is None or maker.op not in ("Expand", "Tile"):
        return False
    before, after = a.shape(maker.inputs[0]), a.shape(tensor)
    if before is None or after is None:
        return False
    at = axis - (len(after) - len(before))
    return 0 <= at < len(before) and before[at] == 1 and after[axis] != 1


def _fold_to(a: Analysis, v: Visit, axis: int, size: int, inserts: list[tuple[int, int]],
             fix: tuple[int, int]) -> None:
    derived = a.derive(v.node, size, inserts, "fold")
    a.copy_blocker(v.node)
    if v.node.op == "Reshape":
        _grow_target(a, v, fix[0], fix[0], fix[1])
    target = v.node.inputs[0] if v.backward else v.node.outputs[0]
    a.add_slot(target, axis, 0, 1, derived.id, v.where)


def _grow_target(a: Analysis, v: Visit, position: int, out_axis: int, delta: int | None) -> None:
    """The shape constant (input 1) of a Reshape or Expand: its entry for the channels grows."""
    node = v.node
    values = constant_ints(node, 1)
    if values is None:
        grow_computed_target(a, v, position, out_axis, delta)
        return
    position -= a.rank(node.outputs[0]) - len(values) if a.rank(node.outputs[0]) else 0
    if position < 0 or values[position] in (-1, 1) and node.op == "Expand" or values[position] == -1:
        return
    if values[position] == 0 and not int(node.attrs.get("allowzero", 0)):
        raise NotApplicable(f"{v.where}: its target copies the channel count (0), cannot follow it")
    a.add_fix(ShapeFix(node.name, 1, position, node.outputs[0].name, out_axis, delta))


def _sole_reader(a: Analysis, tensor: gs.Tensor, op: str) -> gs.Node | None:
    readers = list(tensor.outputs)
    if len(readers) == 1 and readers[0].op == op and tensor.name not in a.outputs:
        return readers[0]
    return None


def _shuffle_around(a: Analysis, first: gs.Node, ax: int) -> tuple[gs.Node, gs.Node, int, int] | None:
    """(Transpose, last Reshape, g, n) when `first` starts a channel shuffle of axis `ax` into g groups of n."""
    src, dst = a.shape(first.inputs[0]), a.shape(first.outputs[0])
    if src is None or dst is None or len(dst) != len(src) + 1 or not dst[ax] or not dst[ax + 1]:
        return None
    if tuple(dst[:ax]) != tuple(src[:ax]) or tuple(dst[ax + 2:]) != tuple(src[ax + 1:]):
        return None
    transpose = _sole_reader(a, first.outputs[0], "Transpose")
    perm = list(range(len(dst)))
    perm[ax], perm[ax + 1] = ax + 1, ax
    if transpose is None or [int(p) for p in transpose.attrs.get("perm", [])] != perm:
        return None
    back = _sole_reader(a, transpose.outputs[0], "Reshape")
    if back is None or tuple(a.shape(back.outputs[0]) or ()) != tuple(src):
        return None
    return transpose, back, int(dst[ax]), int(dst[ax + 1])


def _shuffle_grows(a: Analysis, v: Visit, first: gs.Node, pattern: tuple[gs.Node, gs.Node, int, int],
                   per_group: int) -> None:
    """The shuffle takes `per_group` new channels at the end of each group: its shape constants grow."""
    transpose, back, g, _n = pattern
    ax = v.slot.axis
    if a.memo.setdefault(("shuffle", first.name), v.slot) != v.slot:
        raise NotApplicable(f"{v.where}: two widened tensors reach the channel shuffle at '{first.name}'")
    _grow_target(a, Visit(first, v.slot, first.inputs[0], False), ax + 1, ax + 1, per_group)
    _grow_target(a, Visit(back, v.slot, transpose.outputs[0], False), ax, ax, per_group * g)
    a.result.stale += [first.outputs[0].name, transpose.outputs[0].name]
    a.copy_blocker(first)


def shuffle(a: Analysis, v: Visit) -> None:
    """A channel shuffle, Reshape [.., C, ..] -> [.., g, n, ..] -> Transpose(g, n) -> Reshape back (C = g*n).

    Old channel i*n + j goes to j*g + i. With k new channels at the end of each of the g groups,
    the old channels keep their places and the g*k new ones come out last. Groups outside the
    slot get k new channels of their own (a derived space: their producers get new filters).
    """
    node, slot, ax = v.node, v.slot, v.slot.axis
    where = f"{v.where} splits the channel axis of '{v.tensor.name}'"
    pattern = _shuffle_around(a, node, ax)
    if pattern is None or slot.block != 1:
        d_shape = a.shape(node.outputs[0]) or ()
        if len(d_shape) > ax + 1 and d_shape[ax + 1] and len(d_shape) == (a.rank(v.tensor) or 0) + 1:
            block = d_shape[ax + 1]
            if slot.block == 1 and all(at % block == 0 and c % block == 0 for at, c in insert_positions(
                    a.space(slot.space), slot)):
                raise NotApplicable(f"{where} into blocks of {block} (attention heads, say), but its target's other "
                                    "sizes are computed at run time by arithmetic the analysis cannot match with the "
                                    "tensor's: cannot tell where the new heads go")
            raise NotApplicable(f"{where} into blocks of {block} (attention heads, say): the new channels "
                                f"must be whole blocks (a multiple of {block})")
        raise NotApplicable(f"{where} (e.g. a channel shuffle)")
    _transpose, back, g, n = pattern
    space = a.space(slot.space)
    lo, hi = slot.offset, slot.offset + space.old
    merged: dict[int, int] = {}
    for at, count in insert_positions(space, slot):
        merged[at] = merged.get(at, 0) + count
    inside = [(i + 1) * n for i in range(g) if lo <= (i + 1) * n <= hi]
    k = next(iter(merged.values()))
    if sorted(merged) != inside or len(set(merged.values())) != 1:
        per = space.added // len(inside) if inside and not space.added % len(inside) else 0
        raise Misfit(f"{where} into {g} groups (a channel shuffle): the new channels must be spread evenly over "
                     f"the groups (a multiple of {g})", slot.space, [(at - lo, per) for at in inside] if per else None)
    _shuffle_grows(a, v, node, pattern, k)
    for i in range(g):
        if not lo <= (i + 1) * n <= hi:
            companion = a.derive(node, n, [(n, k)], "shuffle")
            a.add_slot(node.inputs[0], ax, i * n, 1, companion.id, v.where)
    derived = a.derive(back, g * n, [(g * n, g * k)], "shuffle")
    a.add_slot(back.outputs[0], ax, 0, 1, derived.id, v.where)


def unshuffle(a: Analysis, v: Visit) -> None:
    """Backwards through a channel shuffle: new channels at the end of its output come from the end of each group."""
    back, slot, ax = v.node, v.slot, v.slot.axis
    where = f"{v.where} merges the channel axis of '{v.tensor.name}'"
    transpose = back.inputs[0].inputs[0] if back.inputs[0].inputs else None
    first = transpose.inputs[0].inputs[0] if transpose is not None and transpose.inputs[0].inputs else None
    pattern = _shuffle_around(a, first, ax) if first is not None and first.op == "Reshape" else None
    if pattern is None or pattern[1] is not back or slot.block != 1:
        d_shape = a.shape(back.inputs[0]) or ()
        if len(d_shape) == (a.rank(v.tensor) or 0) + 1 and d_shape[ax + 1]:
            raise NotApplicable(f"{where} from blocks of {d_shape[ax + 1]} (query heads sharing a key/value head, "
                                f"say): the new channels must be whole blocks (a multiple of {d_shape[ax + 1]})")
        raise NotApplicable(f"{where} (e.g. a channel shuffle), cannot follow the channels back")
    g, n = pattern[2], pattern[3]
    space = a.space(slot.space)
    positions = insert_positions(space, slot)
    if space.added % g or any(at != g * n for at, _ in positions):
        fits = slot.offset == 0 and space.old == g * n and not space.added % g
        raise Misfit(f"{where} (a channel shuffle of {g} groups): new channels must come last, a multiple of {g}",
                     slot.space, [(space.old, space.added)] if fits else None)
    k = space.added // g
    _shuffle_grows(a, Visit(first, slot, first.inputs[0], False), first, pattern, k)
    derived = a.derive(first, g * n, [((i + 1) * n, k) for i in range(g)], "shuffle")
    a.add_slot(first.inputs[0], ax, 0, 1, derived.id, v.where)


@rule("Transpose")
def transpose(a: Analysis, v: Visit) -> None:
    """The channels move to the permuted axis."""
    node = v.node
    perm = node.attrs.get("perm")
    if perm is None:
        rank = a.rank(node.inputs[0])
        if rank is None:
            raise NotApplicable(f"{v.where}: unknown rank, cannot follow the channels")
        perm = list(range(rank))[::-1]
    perm = [int(p) for p in perm]
    if v.backward:
        a.carry(node, 0, perm[v.slot.axis], v.slot.offset, v.slot.block, v.slot.space)
    else:
        a.add_slot(node.outputs[0], perm.index(v.slot.axis), v.slot.offset, v.slot.block, v.slot.space, v.where)


@rule("Pad")
def pad(a: Analysis, v: Visit) -> None:
    """Padding off the channel axis; a non-zero constant value stops new zero channels being zero."""
    node, slot = v.node, v.slot
    if "pads" in node.attrs:
        pads = [int(p) for p in node.attrs["pads"]]
        value = float(node.attrs.get("value", 0.0))
    elif len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        pads = constant_ints(node, 1) or []
        value = 0.0
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.size:
            value = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
        if len(node.inputs) > 3 and node.inputs[3].name:
            raise NotApplicable(f"{v.where}: padding with explicit axes is not supported")
    else:
        raise NotApplicable(f"{v.where}: its pads are computed")
    rank = len(pads) // 2
    shape = a.shape(node.inputs[0])
    if shape is not None and len(shape) != rank:
        raise NotApplicable(f"{v.where}: unexpected pads length")
    if pads[slot.axis] or pads[slot.axis + rank]:
        raise NotApplicable(f"{v.where} pads the channel axis")
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant" and value != 0.0:
        a.blocker(node, slot.space)
    a.through(v)


@rule("Resize", "Upsample")
def resize(a: Analysis, v: Visit) -> None:
    """Resizing off the channel axis; constant output sizes grow with the channels."""
    node, slot = v.node, v.slot
    if "scales" in node.attrs:
        if float(node.attrs["scales"][slot.axis]) != 1.0:
            raise NotApplicable(f"{v.where} resizes the channel axis")
        a.through(v)
        return
    scale_index = 1 if node.op == "Upsample" or a.graph.opset < 11 else 2
    scales = node.inputs[scale_index] if len(node.inputs) > scale_index else None
    sizes = node.inputs[3] if node.op == "Resize" and len(node.inputs) > 3 else None
    if scales is not None and scales.name and isinstance(scales, gs.Constant) and scales.values.size:
        if float(np.asarray(scales.values).reshape(-1)[slot.axis]) != 1.0:
            raise NotApplicable(f"{v.where} resizes the channel axis")
    elif sizes is not None and isinstance(sizes, gs.Constant) and sizes.values.size:
        if "axes" in node.attrs:
            raise NotApplicable(f"{v.where}: sizes with explicit axes are not supported")
        a.add_fix(ShapeFix(node.name, 3, slot.axis, node.outputs[0].name, slot.axis))
    else:
        raise NotApplicable(f"{v.where}: its scales or sizes are computed")
    a.through(v)


@rule("Slice")
def slice_(a: Analysis, v: Visit) -> None:
    """Slicing other axes passes the channels; on the channel axis the new channels inside the slice go along."""
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    legacy = "starts" in node.attrs
    starts, ends = constant_ints(node, 1, "starts"), constant_ints(node, 2, "ends")
    if v.tensor is not node.inputs[0] and v.tensor is not node.outputs[0]:
        raise NotApplicable(f"{v.where}: the channels reach its parameter '{v.tensor.name}'")
    given = constant_ints(node, 3, "axes")
    if rank is not None and given is not None and slot.axis not in [x % rank for x in given]:
        a.through(v)  # other axes sliced (a rotary half of each head): what it keeps does not matter here
        return
    if (starts is None or ends is None) and rank is not None:
        if v.backward:
            raise NotApplicable(f"{v.where} slices the channel axis of '{node.inputs[0].name}' at bounds computed from "
                                "its size: new channels of its output cannot come back through it (not supported)")
        _computed_slice(a, v)
        return
    if starts is None or ends is None or rank is None:
        raise NotApplicable(f"{v.where}: its starts and ends are computed, cannot tell what it keeps")
    axes = [x % rank for x in (given or range(len(starts)))]
    steps = constant_ints(node, 4) or [1] * len(axes)
    if slot.axis not in axes:
        a.through(v)
        return
    i = axes.index(slot.axis)
    dim = (a.shape(node.inputs[0]) or [None] * rank)[slot.axis]
    if v.backward or steps[i] != 1 or starts[i] < 0 or ends[i] < 0 or dim is None:
        raise NotApplicable(f"{v.where} slices the channel axis of '{v.tensor.name}' (backward, with a step, from "
                            "the end or of unknown size): not supported")
    start, end = min(starts[i], dim), min(ends[i], dim)
    parts = _sliced_parts(a, v.tensor, slot.axis, dim)
    if parts is not None:
        _propose_parts(a, slot, parts, dim)  # q, k and v sliced out of one projection (Phi-3's qkv_proj)
    head = [(0, start)] if start > 0 else []
    counts = _follow_parts(a, v, head + [(start, end), (end, dim)], [None] * len(head) + [node.outputs[0], None],
                           slot.axis)
    before, inside = (counts[0], counts[1]) if head else (0, counts[0])
    if before:
        a.add_fix(ShapeFix(node.name, 1, i, node.outputs[0].name, slot.axis, before, "starts" if legacy else None))
    if before + inside and ends[i] < dim + sum(counts):
        a.add_fix(ShapeFix(node.name, 2, i, node.outputs[0].name, slot.axis, before + inside,
                           "ends" if legacy else None))


def _computed_slice(a: Analysis, v: Visit) -> None:
    """A slice of the channel axis whose bounds are computed from sizes at run time (TorchScript's chunk: `[0,
    size // 2)` and `[size // 2, size)`): it is followed as the slice it is now, and exact when its bounds, evaluated
    at the grown size, are where the new channels put them."""
    node, slot = v.node, v.slot
    dim = (a.shape(node.inputs[0]) or [None] * (slot.axis + 1))[slot.axis]
    bounds = slice_bounds(a, node, slot.axis, dim) if dim is not None else None
    if bounds is None:
        raise NotApplicable(f"{v.where}: its starts and ends are computed, cannot tell what it keeps")
    start, end = bounds
    parts = _sliced_parts(a, v.tensor, slot.axis, dim)
    if parts is not None:
        _propose_parts(a, slot, parts, dim)
    head = [(0, start)] if start > 0 else []
    counts = _follow_parts(a, v, head + [(start, end), (end, dim)], [None] * len(head) + [node.outputs[0], None],
                           slot.axis)
    before, inside = (counts[0], counts[1]) if head else (0, counts[0])
    grown = slice_bounds(a, node, slot.axis, dim, dim + sum(counts))
    want = (start + before, end + before + inside)
    if grown != want:
        raise NotApplicable(f"{v.where}: its bounds, computed from sizes, would become {list(grown or ())} where the "
                            f"new channels need {list(want)}: cannot preserve the function")


@rule("Split")
def split(a: Analysis, v: Visit) -> None:
    """Splitting other axes passes the channels to every part; on the channel axis each part takes its new ones."""
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % rank if rank else None
    if v.tensor is not node.inputs[0] and v.tensor not in node.outputs:
        raise NotApplicable(f"{v.where}: the channels reach its parameter '{v.tensor.name}'")
    if axis is None:
        raise NotApplicable(f"{v.where}: the rank of its input is unknown")
    if axis != slot.axis:
        for t in [node.inputs[0], *node.outputs]:
            if t is not v.tensor:
                a.add_slot(t, slot.axis, slot.offset, slot.block, slot.space, v.where)
        return
    dim = (a.shape(node.inputs[0]) or [None] * rank)[axis]
    sizes = constant_ints(node, 1, "split")
    if sizes is None and dim is not None and not (len(node.inputs) > 1 and node.inputs[1].name):
        each = -(-dim // len(node.outputs))
        sizes = [min(each, dim - k * each) for k in range(len(node.outputs))]
    if sizes is None or dim is None:
        raise NotApplicable(f"{v.where} splits the channel axis of '{v.tensor.name}' with computed sizes: cannot "
                            "follow the channels")
    bounds = [(sum(sizes[:k]), sum(sizes[:k + 1])) for k in range(len(sizes))]
    _propose_parts(a, slot, bounds, dim)
    if v.backward:
        counts = _split_backward(a, v, bounds, dim)
    else:
        counts = _follow_parts(a, v, bounds, list(node.outputs), axis)
    if any(counts):
        a.add_fix(SplitFix(node.name, tuple(s + c for s, c in zip(sizes, counts))))


def _propose_parts(a: Analysis, slot: Slot, bounds: list[tuple[int, int]], dim: int) -> None:
    """A fused projection whose channel axis is cut into `bounds` (a partition of its `dim` entries): offer a growth
    of each part in proportion to its size (query, key and value alike; a multi-query split of H query heads and
    one key and one value head as H : 1 : 1), tried if the placement at the end is refused."""
    space = a.space(slot.space)
    ratio = _ratio_to_root(a, slot.space)
    sizes = [end - start for start, end in bounds]
    if ratio and slot.offset == 0 and slot.block == 1 and space.old == dim and all(
            space.added * size % dim == 0 for size in sizes):
        a.propose([(end * ratio, space.added * size // dim * ratio) for (_, end), size in zip(bounds, sizes)])


class _Resized(shape_eval.Evaluator):
    """Shape arithmetic evaluated with the analysis's sizes, one tensor's axis taken at another size."""

    def __init__(self, a: Analysis, tensor: gs.Tensor | None = None, axis: int = 0, size: int = 0) -> None:
        super().__init__({})
        self.a, self.tensor, self.axis, self.size = a, tensor, axis, size

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        shape = self.a.shape(tensor)
        if tensor is self.tensor and shape is not None:
            return tuple(self.size if k == self.axis else d for k, d in enumerate(shape))
        return shape


def slice_bounds(a: Analysis, node: gs.Node, axis: int, dim: int, size: int | None = None
                 ) -> tuple[int, int] | None:
    """[start, end) of Slice `node` on `axis` of its input (of `dim` entries), with step 1: constant, or computed at
    run time from sizes (a chunk of `Shape(x)[axis] // 2`), then evaluated with the input's axis at `size` entries
    when given. None when it does not slice that axis with step 1 or cannot be evaluated."""
    rank = a.rank(node.inputs[0])
    axes = constant_ints(node, 3, "axes")
    if rank is None:
        return None
    axes = [x % rank for x in (axes if axes is not None else range(rank))]
    if axis not in axes or (constant_ints(node, 4) or [1] * len(axes))[axes.index(axis)] != 1:
        return None
    ev = _Resized(a, node.inputs[0], axis, size) if size is not None else _Resized(a)
    found = []
    for k, attr in ((1, "starts"), (2, "ends")):
        values = constant_ints(node, k, attr)
        if values is None and k < len(node.inputs) and node.inputs[k].name:
            values = ev.values(node.inputs[k])
        if values is None or len(values) <= axes.index(axis) or values[axes.index(axis)] is None:
            return None
        found.append(values[axes.index(axis)])
    length = dim if size is None else size
    start, end = (found[0] + length if found[0] < 0 else found[0]), (found[1] + length if found[1] < 0 else found[1])
    return min(start, length), min(end, length)


def _sliced_parts(a: Analysis, tensor: gs.Tensor, axis: int, dim: int) -> list[tuple[int, int]] | None:
    """The parts [start, end) that Slices of `tensor` on `axis` (step 1) cut, when they partition it."""
    parts = []
    for node in tensor.outputs:
        if node.op != "Slice" or node.inputs[0] is not tensor:
            continue
        bounds = slice_bounds(a, node, axis, dim)
        if bounds is not None:
            parts.append(bounds)
    parts = sorted(set(parts))
    if len(parts) < 2 or parts[0][0] != 0 or parts[-1][1] != dim or any(
            p[1] != q[0] for p, q in zip(parts, parts[1:])):
        return None
    return parts


def _ratio_to_root(a: Analysis, space_id: int) -> int | None:
    """Entries of the widened layer's channels (space 0) per channel of `space_id`: 1 for space 0 itself, k for a
    space a reshape made by grouping them k at a time (heads of k channels); None for anything else."""
    if space_id == 0:
        return 1
    space, root = a.space(space_id), a.space(0)
    if space.kind not in ("heads", "fold") or not space.old or root.old % space.old:
        return None
    k = root.old // space.old
    return k if root.inserts == tuple((p * k, c * k) for p, c in space.inserts) else None


def _split_backward(a: Analysis, v: Visit, bounds: list[tuple[int, int]], dim: int) -> list[int]:
    """New channels in one part of a Split come from the same place of its input (a derived space there)."""
    k = next(i for i, t in enumerate(v.node.outputs) if t is v.tensor)
    root = [s for s in a.by_tensor.get(v.node.inputs[0].name, []) if s.space == 0]
    if root:
        # the widened layer writes the whole split: spread its new channels over every part (fused Q, K, V)
        added = a.space(0).added
        spread = [(end, added // len(bounds)) for _, end in bounds]
        fits = not added % len(bounds) and root[0].offset == 0 and root[0].block == 1
        raise Misfit(f"{v.where}: new channels in one of its parts need new channels in the others", 0,
                     spread if fits else None)
    positions = insert_positions(a.space(v.slot.space), v.slot)
    derived = a.derive(v.node, dim, [(bounds[k][0] + at, c) for at, c in positions], "part")
    a.copy_blocker(v.node)
    a.add_slot(v.node.inputs[0], v.slot.axis, 0, 1, derived.id, v.where)
    counts = [0] * len(bounds)
    counts[k] = derived.added
    return counts


@rule("Gather")
def gather(a: Analysis, v: Visit) -> None:
    """Gathering along another axis passes the channels (shifted by the indices' rank)."""
    node, slot = v.node, v.slot
    rank = a.rank(node.inputs[0])
    idx = a.rank(node.inputs[1]) if not isinstance(node.inputs[1], gs.Constant) else len(node.inputs[1].shape)
    if rank is None or idx is None and not isinstance(node.inputs[1], gs.Constant):
        raise NotApplicable(f"{v.where}: the ranks around it are unknown, cannot follow the channels")
    idx = idx or 0
    axis = int(node.attrs.get("axis", 0)) % rank
    if v.tensor is node.inputs[1]:
        raise NotApplicable(f"{v.where}: the channels reach its indices")
    if not v.backward:
        if slot.axis == axis:
            raise NotApplicable(f"{v.where} gathers along the channel axis of '{v.tensor.name}': not supported")
        out_axis = slot.axis if slot.axis < axis else slot.axis + idx - 1
        a.add_slot(node.outputs[0], out_axis, slot.offset, slot.block, slot.space, v.where)
        return
    if axis <= slot.axis < axis + idx:
        raise NotApplicable(f"{v.where}: its channel axis comes from the indices")
    in_axis = slot.axis if slot.axis < axis else slot.axis - idx + 1
    a.carry(node, 0, in_axis, slot.offset, slot.block, slot.space)


@rule("Expand", "Tile")
def expand(a: Analysis, v: Visit) -> None:
    """Broadcasting or tiling other axes: the channels pass (a constant input grows, a shape constant too)."""
    node, slot = v.node, v.slot
    out_rank, in_rank = a.rank(node.outputs[0]), a.rank(node.inputs[0])
    if v.tensor is not node.inputs[0] and v.tensor is not node.outputs[0]:
        raise NotApplicable(f"{v.where}: the channels reach its shape input")
    if out_rank is None or in_rank is None:
        raise NotApplicable(f"{v.where}: the ranks around it are unknown, cannot follow the channels")
    out_axis = slot.axis + (out_rank - in_rank) if not v.backward else slot.axis
    in_axis = out_axis - (out_rank - in_rank)
    if node.op == "Tile":
        repeats = constant_ints(node, 1)
        if repeats is None or repeats[in_axis] != 1:
            raise NotApplicable(f"{v.where} repeats the channel axis (or its repeats are computed)")
    else:
        _grow_target(a, v, out_axis, out_axis, None)
    if not v.backward:
        a.add_slot(node.outputs[0], out_axis, slot.offset, slot.block, slot.space, v.where)
    elif in_axis >= 0 and ((a.shape(node.inputs[0]) or [None] * in_rank)[in_axis] != 1 or (
            a.shape(node.outputs[0]) or [None] * out_rank)[out_axis] == 1):  # (one channel, not broadcast)
        a.carry(node, 0, in_axis, slot.offset, slot.block, slot.space)
    else:
        a.blocker(node, slot.space)  # the new channels are copies of one broadcast value
