"""Reductions and ops along an axis for onnxmorph.train: Reduce*, ArgMax/ArgMin, CumSum, TopK, Softmax.

ONNX moved the reduced axes from an attribute to an input (ReduceSum at opset 13, the others at 18);
each op is registered for both, and an empty axes list reduces everything unless
noop_with_empty_axes says to do nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from onnxmorph.train.ops_shape import ints
from onnxmorph.train.optable import Call, op

Tensor = torch.Tensor


def _sum(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sum(x, dim=dims, keepdim=keep)


def _mean(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.mean(x, dim=dims, keepdim=keep)


def _max(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.amax(x, dim=dims, keepdim=keep)


def _min(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.amin(x, dim=dims, keepdim=keep)


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    # torch.prod takes one dim at a time; the highest first keeps the others' numbers valid.
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


def _l1(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sum(torch.abs(x), dim=dims, keepdim=keep)


def _l2(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))


def _sum_square(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sum(x * x, dim=dims, keepdim=keep)


def _log_sum(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.log(torch.sum(x, dim=dims, keepdim=keep))


def _log_sum_exp(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.logsumexp(x, dim=dims, keepdim=keep)


Reduction = Callable[[Tensor, list[int], bool], Tensor]

# op -> (reduction, the opset whose axes became an input)
_REDUCTIONS: dict[str, tuple[Reduction, int]] = {
    "ReduceSum": (_sum, 13), "ReduceMean": (_mean, 18), "ReduceMax": (_max, 18), "ReduceMin": (_min, 18),
    "ReduceProd": (_prod, 18), "ReduceL1": (_l1, 18), "ReduceL2": (_l2, 18), "ReduceSumSquare": (_sum_square, 18),
    "ReduceLogSum": (_log_sum, 18), "ReduceLogSumExp": (_log_sum_exp, 18),
}


def _reduce(call: Call, reduction: Reduction, x: Tensor, axes: Sequence[int] | None) -> Tensor:
    keep = bool(call.attr("keepdims", 1))
    if not axes:
        if call.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = sorted({int(a) % x.dim() for a in axes}) if x.dim() else []
    if not dims:
        return x
    return reduction(x, dims, keep)


def _with_attribute(reduction: Reduction) -> Callable[..., Tensor]:
    def apply(call: Call, x: Tensor) -> Tensor:
        return _reduce(call, reduction, x, call.attr("axes"))
    return apply


def _with_input(reduction: Reduction) -> Callable[..., Tensor]:
    def apply(call: Call, x: Tensor, axes: Tensor | None = None) -> Tensor:
        return _reduce(call, reduction, x, ints(axes))
    return apply


for _name, (_reduction, _input_since) in _REDUCTIONS.items():
    op(_name, since=1)(_with_attribute(_reduction))
    op(_name, since=_input_since)(_with_input(_reduction))


def _arg(call: Call, x: Tensor, largest: bool) -> Tensor:
    axis = call.attr("axis", 0) % x.dim()
    keep = bool(call.attr("keepdims", 1))
    if call.attr("select_last_index", 0):
        flipped = torch.flip(x, [axis])
        index = (torch.argmax if largest else torch.argmin)(flipped, dim=axis, keepdim=keep)
        return x.shape[axis] - 1 - index
    # torch returns the first extreme index, as ONNX does by default.
    return (torch.argmax if largest else torch.argmin)(x, dim=axis, keepdim=keep)


@op("ArgMax")
def _argmax(call: Call, x: Tensor) -> Tensor:
    return _arg(call, x, True)


@op("ArgMin")
def _argmin(call: Call, x: Tensor) -> Tensor:
    return _arg(call, x, False)


@op("CumSum", since=11)
def _cumsum(call: Call, x: Tensor, axis: Tensor) -> Tensor:
    dim = int(axis.reshape(-1)[0].item()) % x.dim()
    if call.attr("reverse", 0):
        x = torch.flip(x, [dim])
    out = torch.cumsum(x, dim=dim)
    if call.attr("exclusive", 0):
        out = out - x
    return torch.flip(out, [dim]) if call.attr("reverse", 0) else out


def _topk(call: Call, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    axis = call.attr("axis", -1) % x.dim()
    largest = bool(call.attr("largest", 1))
    # Ties: onnxruntime lists the lower index first; a stable sort on the negated values does too.
    order = torch.sort(-x if largest else x, dim=axis, stable=True).indices.narrow(axis, 0, k)
    return torch.gather(x, axis, order), order


@op("TopK", since=1, outputs=2)
def _topk_1(call: Call, x: Tensor) -> tuple[Tensor, Tensor]:
    return _topk(call, x, call.attr("k"))


@op("TopK", since=10, outputs=2)
def _topk_10(call: Call, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return _topk(call, x, int(k.reshape(-1)[0].item()))


def _softmax(call: Call, x: Tensor, function: Callable[..., Tensor]) -> Tensor:
    if call.opset >= 13:
        return function(x, dim=call.attr("axis", -1))
    # Before opset 13 the input was coerced to 2-D at `axis` (default 1).
    axis = call.attr("axis", 1) % x.dim()
    return function(x.reshape(int(np.prod(x.shape[:axis])), -1), dim=1).reshape(x.shape)


@op("Softmax")
def _softmax_op(call: Call, x: Tensor) -> Tensor:
    return _softmax(call, x, torch.softmax)


@op("LogSoftmax")
def _log_softmax_op(call: Call, x: Tensor) -> Tensor:
    return _softmax(call, x, torch.log_softmax)


@op("Hardmax")
def _hardmax(call: Call, x: Tensor) -> Tensor:
    def hardmax(t: Tensor, dim: int) -> Tensor:
        return torch.zeros_like(t).scatter(dim, torch.argmax(t, dim=dim, keepdim=True), 1.0)
    return _softmax(call, x, hardmax)
