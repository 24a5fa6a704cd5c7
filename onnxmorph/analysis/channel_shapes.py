"""Channel rules for sizes read at run time: `Shape` of a widened tensor, and reshape targets computed from sizes.

Exporters build reshape targets at run time: `Concat(Shape(x)[0:2], [C])` restores `[batch, seq, C]`
after a `[B*T, C]` product (Hugging Face's `Conv1D`), `Concat([-1], Shape(x)[-1:])` flattens,
`[B, kv * n_rep, T, d]` repeats grouped-query heads. What such a target holds is worked out entry by
entry (`entries`): a constant, the size of axis i of tensor t read with `Shape`, or such a size times a
constant (`Scaled`), through the Gather/Slice/Squeeze/Unsqueeze/Concat/Cast/Mul that pick and assemble
the pieces. Then:

* `Shape` of a widened tensor is exact when every use of its channel entry ends in a Reshape or
  Expand target whose output grows on that entry's axis by as many channels (times the factor): the
  size it reads becomes the new one by itself. Uses that pick other entries need nothing; any other
  use (arithmetic, a graph output) refuses. The growths are compared when the analysis ends.
* A computed target whose channel entry is a constant piece of a Concat grows that piece, in a copy
  of the Concat when other nodes read it too (layers of other blocks that do not grow).
* Sizes that shape inference leaves unknown are compared by how they were built, and widen infers
  shapes with generic dynamic input sizes (`onnxmorph.analysis.sizes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxmorph.analysis.coupling import ShapeFix, Visit, constant_ints, rule

if TYPE_CHECKING:  # the traversal imports this module
    from onnxmorph.analysis.channels import Analysis
from onnxmorph.analysis.sizes import PASS, PICK, entries, size_of
from onnxmorph.errors import NotApplicable


def _check_growth(a: Analysis, node: gs.Node, position: int, grows: tuple[str, int], why: str,
                  factor: int = 1) -> None:
    """When the analysis ends: the target entry `position` of `node` grows as `grows` (tensor, axis) does, times
    `factor`, which must be what its output grows by on that axis."""
    key = ("check", node.name, position, grows, factor)
    if key in a.memo:
        return
    a.memo[key] = True
    out = node.outputs[0]
    values = entries(a, node.inputs[1])
    length = len(values) if values is not None else (a.shape(node.inputs[1]) or (None,))[0]
    axis = position + a.rank(out) - length if length is not None and a.rank(out) else position

    def check() -> None:
        need, got = a.result.added(out.name, axis), a.result.added(*grows) * factor
        if need != got:
            raise NotApplicable(f"{node.op} '{node.name}': {why}, which grows by {got} where its output grows by "
                                f"{need}: cannot preserve the function")
    a.checks.append(check)


@rule("Shape")  # no channels come out of it: nothing for a zero channel to become
def shape(a: Analysis, v: Visit) -> None:
    """A size read from a widened tensor: exact when its channel entry only ends in targets that grow as much."""
    read = (v.tensor.name, v.slot.axis)
    where = f"{v.where} reads the channel count of '{v.tensor.name}'"
    stack, seen = [v.node.outputs[0]], set()
    while stack:
        tensor = stack.pop()
        values = entries(a, tensor)
        if values is not None and not any((size_of(e) or ())[:2] == read for e in values) or tensor.name in seen:
            continue  # this piece of the shape does not hold the channel count
        seen.add(tensor.name)
        if values is None or tensor.name in a.outputs:
            raise NotApplicable(f"{where}, and its use '{tensor.name}' cannot be followed: widening it cannot "
                                "preserve the function")
        for node in tensor.outputs:
            if node.op in ("Reshape", "Expand") and len(node.inputs) > 1 and node.inputs[1] is tensor:
                for position, entry in enumerate(values):
                    size = size_of(entry)
                    if size is not None and size[:2] == read:
                        _check_growth(a, node, position, read, f"its target reads the size of '{v.tensor.name}'",
                                      size[2])
            elif node.op in ("Shape", "Size") or node.op == "Equal" and all(
                    n.op == "Where" and n.inputs[2] is tensor for n in node.outputs[0].outputs):
                continue  # the length of a shape tensor; the test of Where(t == c, u, t), followed through t
            elif node.op in PASS + PICK and node.inputs[0] is tensor or node.op == "Concat" or (
                    node.op in ("Mul", "Where") and entries(a, node.outputs[0]) is not None):
                stack.append(node.outputs[0])
            elif _slice_bounds_of(a, node, v.tensor, v.slot.axis):
                continue  # a chunk of the tensor itself (size // 2): the Slice rule checks its bounds
            else:
                raise NotApplicable(f"{where}, and {node.op} '{node.name}' computes with it: widening it cannot "
                                    "preserve the function")


_BOUND_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Gather",
                     "Slice", "Concat")


def _slice_bounds_of(a: Analysis, node: gs.Node, source: gs.Tensor, axis: int) -> bool:
    """Whether what `node` computes from a size read of `source` only ends as starts or ends of Slices of `source`
    itself on the channel `axis` (the Slice rule then checks that the bounds move with the new channels)."""
    rank = a.rank(source)
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.op not in _BOUND_ARITHMETIC or not current.outputs:
            return False
        for out in current.outputs:
            if not out.outputs:
                return False
            for reader in out.outputs:
                axes = constant_ints(reader, 3, "axes") if reader.op == "Slice" else None
                if reader.op == "Slice" and reader.inputs[0] is source and out in reader.inputs[1:3] and not any(
                        t is out for t in reader.inputs[3:]) and rank and axes in ([axis], [axis - rank]):
                    continue
                if reader.op == "Slice" and reader.inputs[0] is out:
                    stack.append(reader)  # picking an entry of the size vector
                    continue
                stack.append(reader)
    return True


def grow_computed_target(a: Analysis, v: Visit, position: int, out_axis: int, delta: int | None) -> None:
    """The channel entry of a target computed at run time (see the module docstring)."""
    node = v.node
    target = node.inputs[1]
    values = entries(a, target)
    length = len(values) if values is not None else (a.shape(target) or (None,))[0]
    if length is not None and a.rank(node.outputs[0]):
        position -= a.rank(node.outputs[0]) - length  # an Expand's target may be shorter than its output's rank
    if values is not None and 0 <= position < len(values):
        entry = values[position]
        size = size_of(entry)
        if size is not None:  # a size read with Shape: it grows with its tensor, if that tensor grows
            _check_growth(a, node, position, size[:2], f"its target reads the size of '{size[0]}' for the channels",
                          size[2])
            return
        if entry == -1 or entry == 1 and node.op == "Expand":
            return
    concat = target.inputs[0] if target.inputs else None
    if concat is None or concat.op != "Concat":
        raise NotApplicable(f"{v.where}: its target shape is computed, cannot resize it")
    start = 0
    for k, piece in enumerate(concat.inputs):
        piece_values = constant_ints(concat, k)
        size = len(piece_values) if piece_values is not None else (a.shape(piece) or (None,))[0]
        if size is None or start + size > position:
            if piece_values is None or size is None:
                break
            entry = piece_values[position - start]
            if entry == -1 or entry == 1 and node.op == "Expand":
                return
            if entry == 0 and not int(node.attrs.get("allowzero", 0)):
                break
            _grow_piece(a, v, concat, k, position - start, out_axis, delta)
            return
        start += size
    raise NotApplicable(f"{v.where}: the channel count in its computed target shape cannot be resized")


def _grow_piece(a: Analysis, v: Visit, concat: gs.Node, k: int, at: int, out_axis: int, delta: int | None) -> None:
    """Constant piece `k` of `concat` grows at `at` for this target; a Concat other nodes read too is copied for it."""
    a.add_fix(ShapeFix(concat.name, k, at, v.node.outputs[0].name, out_axis, delta, reader=v.node.name))
