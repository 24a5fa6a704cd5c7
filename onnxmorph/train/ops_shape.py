"""Shape, indexing and data-movement ONNX ops for onnxmorph.train (Reshape, Gather, Slice, Pad, ...).

Sizes that ONNX passes as tensors (a Reshape target, Slice bounds) are read as Python ints; the
tensors they come from never need a gradient. Shape computations run on the device of the tensors
they read, so a module moved to a GPU stays there. Indices follow ONNX: negative ones count from
the end, out-of-range Slice bounds are clamped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnxmorph import limits
from onnxmorph.train.optable import Call, broadcast, op, torch_dtype

Tensor = torch.Tensor


def ints(t: Tensor | None) -> list[int] | None:
    """A tensor of sizes or indices as a list of Python ints (None stays None)."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _positive(axes: Sequence[int], rank: int) -> list[int]:
    return [int(a) % rank if rank else 0 for a in axes]


def from_numpy(array: np.ndarray, device: torch.device | None = None) -> Tensor:
    """A tensor of an ONNX constant (bfloat16 arrives from onnx as ml_dtypes, which torch cannot read)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(array, np.float32)).to(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(array)).to(device)


# ---------------------------------------------------------------- constants and sizes


@op("Constant")
def _constant(call: Call) -> Tensor:
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if name in call.attrs:
            value = call.attrs[name]
            if name == "value":
                return from_numpy(numpy_helper.to_array(value))
            return torch.tensor(value, dtype=torch.float32 if "float" in name else torch.int64)
    call.refuse("only dense numeric Constants are supported (not sparse or string ones)")


@op("ConstantOfShape", since=9)
def _constant_of_shape(call: Call, shape: Tensor) -> Tensor:
    value = call.attr("value")
    fill = from_numpy(numpy_helper.to_array(value), shape.device) if value is not None else \
        torch.zeros(1, dtype=torch.float32, device=shape.device)
    dims = ints(shape)
    call.room(dims, fill.dtype)
    return fill.reshape(-1)[:1].reshape(()).expand(dims).clone()


@op("Shape", since=1)
def _shape(call: Call, x: Tensor) -> Tensor:
    # Opset 15's start and end slice the shape, clamped as Slice clamps.
    dims = x.shape[call.attr("start", 0):call.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def _size(call: Call, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Range", since=11)
def _range(call: Call, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    # ONNX's definition: max(ceil((limit - start) / delta), 0) elements start + i * delta.
    first, last, step = start.item(), limit.item(), delta.item()
    if not all(map(np.isfinite, (first, last, step))) or step == 0:
        call.refuse(f"start {first}, limit {last}, delta {step}: a Range needs finite bounds and a delta other than 0")
    count = max(int(np.ceil((last - first) / step)), 0)
    call.room([count], start.dtype)
    return start + torch.arange(count, device=start.device, dtype=start.dtype) * delta


# ---------------------------------------------------------------- reshaping


@op("Reshape", since=5)
def _reshape(call: Call, x: Tensor, shape: Tensor) -> Tensor:
    dims = ints(shape)
    if not call.attr("allowzero", 0):  # 0 copies the input's size (allowzero, opset 14, keeps a real 0)
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def _flatten(call: Call, x: Tensor) -> Tensor:
    axis = call.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@op("Transpose")
def _transpose(call: Call, x: Tensor) -> Tensor:
    perm = call.attr("perm")
    return x.permute(list(reversed(range(x.dim()))) if perm is None else perm)


def _squeeze(x: Tensor, axes: Sequence[int] | None) -> Tensor:
    if axes is None:
        return x.squeeze()
    for axis in sorted(_positive(axes, x.dim()), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(x: Tensor, axes: Sequence[int]) -> Tensor:
    for axis in sorted(_positive(axes, x.dim() + len(axes))):
        x = x.unsqueeze(axis)
    return x


@op("Squeeze", since=1)
def _squeeze_1(call: Call, x: Tensor) -> Tensor:
    return _squeeze(x, call.attr("axes"))


@op("Squeeze", since=13)
def _squeeze_13(call: Call, x: Tensor, axes: Tensor | None = None) -> Tensor:
    return _squeeze(x, ints(axes))


@op("Unsqueeze", since=1)
def _unsqueeze_1(call: Call, x: Tensor) -> Tensor:
    return _unsqueeze(x, call.attr("axes"))


@op("Unsqueeze", since=13)
def _unsqueeze_13(call: Call, x: Tensor, axes: Tensor) -> Tensor:
    return _unsqueeze(x, ints(axes))


@op("Concat", since=4)
def _concat(call: Call, *xs: Tensor) -> Tensor:
    # A 1-D empty tensor joins anything (exporters concatenate shape pieces that may be empty).
    parts = [x for x in xs if x.numel() or x.dim() != 1] or list(xs[:1])
    # (one input may be listed many times: the output is the sum of the listed sizes)
    call.room([sum(x.numel() for x in parts)], parts[0].dtype)
    return torch.cat(parts, dim=call.attr("axis"))


@op("Split", since=2, outputs=1 << 16)
def _split_2(call: Call, x: Tensor) -> tuple[Tensor, ...]:
    return _split(call, x, call.attr("split"))


@op("Split", since=13, outputs=1 << 16)
def _split_13(call: Call, x: Tensor, split: Tensor | None = None) -> tuple[Tensor, ...]:
    return _split(call, x, ints(split))


def _split(call: Call, x: Tensor, sizes: Sequence[int] | None) -> tuple[Tensor, ...]:
    axis = call.attr("axis", 0)
    count = call.attr("num_outputs", call.outputs)
    if sizes is None:
        length = x.shape[axis]
        part = -(-length // count)  # opset 18's num_outputs: equal parts, the last one smaller
        if call.attr("num_outputs") is None and length % count:
            call.refuse(f"cannot split {length} into {count} equal parts")
        sizes = [min(part, length - k * part) for k in range(count)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@op("Expand", since=8)
def _expand(call: Call, x: Tensor, shape: Tensor) -> Tensor:
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's size.
    dims = ints(shape)
    if any(d < 0 for d in dims):
        call.refuse(f"a negative size in its target shape {limits.quote(dims, 120)}")
    call.room(broadcast(x.shape, dims), x.dtype)  # (a view, but every later op on it makes the whole)
    return x.expand(torch.broadcast_shapes(x.shape, tuple(dims)))


@op("Tile", since=6)
def _tile(call: Call, x: Tensor, repeats: Tensor) -> Tensor:
    times = ints(repeats)
    if len(times) != x.dim() or any(t < 0 for t in times):
        call.refuse(f"repeats {limits.quote(times, 120)}: one non-negative count per axis of its {x.dim()}-D input")
    call.room([size * t for size, t in zip(x.shape, times)], x.dtype)
    return x.repeat(*times)


@op("Trilu", since=14)
def _trilu(call: Call, x: Tensor, k: Tensor | None = None) -> Tensor:
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if call.attr("upper", 1) else torch.tril(x, diagonal)


# ---------------------------------------------------------------- indexing


def _wrap(indices: Tensor, size: int | Tensor) -> Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def _gather(call: Call, data: Tensor, indices: Tensor) -> Tensor:
    axis = call.attr("axis", 0) % data.dim()
    call.room([*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]], data.dtype)
    flat = _wrap(indices.reshape(-1), data.shape[axis])
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


@op("GatherElements", since=11)
def _gather_elements(call: Call, data: Tensor, indices: Tensor) -> Tensor:
    axis = call.attr("axis", 0) % data.dim()
    return torch.gather(data, axis, _wrap(indices, data.shape[axis]))


def _nd_index(call: Call, data: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """GatherND/ScatterND's indices as flat positions into `data` viewed as [batch, positions, *tail]."""
    batch_dims = call.attr("batch_dims", 0)
    depth = indices.shape[-1]
    batch = int(np.prod(data.shape[:batch_dims]))
    indexed = data.shape[batch_dims:batch_dims + depth]
    sizes = torch.tensor(indexed, dtype=torch.int64, device=indices.device)
    wrapped = _wrap(indices, sizes)
    strides = [int(np.prod(indexed[k + 1:])) for k in range(depth)]
    flat = (wrapped * torch.tensor(strides, dtype=torch.int64, device=indices.device)).sum(-1)
    return flat.reshape(batch, -1), sizes, batch, int(np.prod(indexed))


@op("GatherND", since=11)
def _gather_nd(call: Call, data: Tensor, indices: Tensor) -> Tensor:
    batch_dims = call.attr("batch_dims", 0)
    depth = indices.shape[-1]
    call.room([*indices.shape[:-1], *data.shape[batch_dims + depth:]], data.dtype)
    flat, _, batch, positions = _nd_index(call, data, indices)
    tail = data.shape[batch_dims + depth:]
    table = data.reshape(batch, positions, *tail)
    rows = torch.arange(batch, device=data.device).unsqueeze(1)
    return table[rows, flat].reshape(*indices.shape[:-1], *tail)


def _reduced(call: Call, reduction: str, old: Tensor, new: Tensor) -> Tensor:
    if reduction == "none":
        return new
    if reduction == "add":
        return old + new
    if reduction == "mul":
        return old * new
    if reduction == "max":
        return torch.maximum(old, new)
    if reduction == "min":
        return torch.minimum(old, new)
    call.refuse(f"reduction={reduction!r} is not supported")


@op("ScatterND", since=11)
def _scatter_nd(call: Call, data: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    depth = indices.shape[-1]
    flat, _, batch, positions = _nd_index(call, data, indices)
    tail = data.shape[depth:]
    table = data.reshape(positions, *tail)
    index = flat.reshape(-1)
    values = updates.reshape(-1, *tail)
    reduction = call.attr("reduction", "none")
    if reduction == "none":
        out = table.index_put((index,), values)
    elif reduction == "add":
        out = table.index_put((index,), values, accumulate=True)
    else:  # each index at most once for mul/max/min is what exporters write; apply as a gather-combine
        out = table.index_put((index,), _reduced(call, reduction, table[index], values))
    return out.reshape(data.shape)


@op("ScatterElements", since=11)
def _scatter_elements(call: Call, data: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    axis = call.attr("axis", 0) % data.dim()
    index = _wrap(indices, data.shape[axis])
    reduction = call.attr("reduction", "none")
    if reduction == "none":
        return torch.scatter(data, axis, index, updates)
    torch_reduction = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(reduction)
    if torch_reduction is None:
        call.refuse(f"reduction={reduction!r} is not supported")
    return torch.scatter_reduce(data, axis, index, updates, torch_reduction, include_self=True)


@op("Slice", since=1)
def _slice_1(call: Call, x: Tensor) -> Tensor:
    return _slice(x, call.attr("starts"), call.attr("ends"), call.attr("axes"), None)


@op("Slice", since=10)
def _slice_10(call: Call, x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None,
              steps: Tensor | None = None) -> Tensor:
    return _slice(x, ints(starts), ints(ends), ints(axes), ints(steps))


def _slice(x: Tensor, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int] | None,
           steps: Sequence[int] | None) -> Tensor:
    axes = list(range(len(starts))) if axes is None else _positive(axes, x.dim())
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        # ONNX clamps out-of-range bounds (exporters write INT64_MAX for "to the end").
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            x = x.narrow(axis, start, max(end - start, 0))[(slice(None),) * axis + (slice(None, None, step),)]
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            index = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, index)
    return x


@op("OneHot", since=9)
def _one_hot(call: Call, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
    size = int(depth.reshape(-1)[0].item())
    # F.one_hot makes int64 before the values are chosen: 8 bytes an element
    call.room([*indices.shape, size], torch.int64)
    index = _wrap(indices, size)
    axis = call.attr("axis", -1)
    axis = axis + indices.dim() + 1 if axis < 0 else axis
    # Out-of-range indices give a row of `off` values (F.one_hot would raise on them).
    valid = (index >= 0) & (index < size)
    hot = F.one_hot(torch.where(valid, index, 0), size).to(torch.bool) & valid.unsqueeze(-1)
    hot = hot.movedim(-1, axis)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off)


@op("NonZero", since=9)
def _nonzero(call: Call, x: Tensor) -> Tensor:
    call.room([max(x.dim(), 1), x.numel()], torch.int64)
    return torch.nonzero(x).t().contiguous() if x.dim() else torch.zeros((0, int(bool(x))), dtype=torch.int64)


@op("EyeLike", since=9)
def _eye_like(call: Call, x: Tensor) -> Tensor:
    dtype = torch_dtype(call.attr("dtype")) if call.attr("dtype") is not None else x.dtype
    rows, cols = x.shape
    return _eye(rows, cols, call.attr("k", 0), dtype, x.device)


def _eye(rows: int, cols: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    return (c - r == k).to(dtype)


# ---------------------------------------------------------------- padding


@op("Pad", since=2)
def _pad_2(call: Call, x: Tensor) -> Tensor:
    return _pad(call, x, call.attr("pads"), call.attr("value", 0.0), None)


@op("Pad", since=11)
def _pad_11(call: Call, x: Tensor, pads: Tensor, value: Tensor | None = None, axes: Tensor | None = None) -> Tensor:
    return _pad(call, x, ints(pads), value, ints(axes))


def _pad(call: Call, x: Tensor, pads: Sequence[int], value: float | Tensor | None,
         axes: Sequence[int] | None) -> Tensor:
    axes = list(range(x.dim())) if axes is None else _positive(axes, x.dim())
    n = len(axes)
    if len(pads) != 2 * n:
        call.refuse(f"pads {limits.quote(pads, 120)}: two per padded axis ({n})")
    out = list(x.shape)
    for k, axis in enumerate(axes):
        out[axis] += pads[k] + pads[k + n]
    call.room(out, x.dtype)
    mode = call.attr("mode", "constant")
    if mode == "constant":
        torch_pads: list[int] = [0, 0] * x.dim()
        for k, axis in enumerate(axes):  # F.pad lists the last axis first
            torch_pads[2 * (x.dim() - 1 - axis)] = pads[k]
            torch_pads[2 * (x.dim() - 1 - axis) + 1] = pads[k + n]
        fill = 0.0 if value is None else value
        if isinstance(fill, torch.Tensor):
            # A tensor fill keeps its gradient: pad with 0, then add fill where the pads are.
            inside = F.pad(torch.ones_like(x, dtype=torch.bool), torch_pads, value=False)
            return torch.where(inside, F.pad(x, torch_pads), fill.reshape(()).to(x.dtype))
        return F.pad(x, torch_pads, value=float(fill))
    for k, axis in enumerate(axes):
        before, after = pads[k], pads[k + n]
        size = x.shape[axis]
        if before < 0:
            x, size, before = x.narrow(axis, -before, size + before), size + before, 0
        if after < 0:
            x, size, after = x.narrow(axis, 0, size + after), size + after, 0
        if not before and not after:
            continue
        position = torch.arange(-before, size + after, device=x.device)
        if mode == "edge":
            index = position.clamp(0, size - 1)
        elif mode == "wrap":
            index = position % size
        elif mode == "reflect":
            if size == 1:
                index = torch.zeros_like(position)
            else:
                period = 2 * (size - 1)
                folded = position % period
                index = torch.where(folded < size, folded, period - folded)
        else:
            call.refuse(f"mode={mode!r} is not an ONNX Pad mode")
        x = x.index_select(axis, index)
    return x
