"""Layers of onnxmorph.train: MatMul, Gemm, Einsum, Conv and the pools, with ONNX's padding rules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onnxmorph.train.optable import Call, broadcast, op

Tensor = torch.Tensor


@op("MatMul")
def _matmul(call: Call, a: Tensor, b: Tensor) -> Tensor:
    # [.., M, K] @ [.., K, N]: the batch axes broadcast ([N, 1, M, K] @ [1, N, K, M] is N x N x M x M)
    if a.numel() * b.numel() * a.dtype.itemsize > call.max_bytes:  # (the output has at most that many elements)
        rows = [a.shape[-2]] if a.dim() > 1 else []
        columns = [b.shape[-1]] if b.dim() > 1 else []
        call.room([*broadcast(a.shape[:-2], b.shape[:-2]), *rows, *columns], a.dtype)
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(call: Call, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.t() if call.attr("transA", 0) else a
    b = b.t() if call.attr("transB", 0) else b
    call.room([a.shape[0], b.shape[-1]], a.dtype)  # [M, 1] @ [1, N] is M x N
    alpha, beta = call.attr("alpha", 1.0), call.attr("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return y
    return y + (c if beta == 1.0 else beta * c)


@op("Einsum", since=12)
def _einsum(call: Call, *xs: Tensor) -> Tensor:
    equation = call.attr("equation").replace(" ", "")
    # The output's shape from shapes alone (tensors on the meta device hold no data): an outer product is large.
    shape = torch.einsum(equation, *[torch.empty(x.shape, dtype=x.dtype, device="meta") for x in xs]).shape
    call.room(shape, xs[0].dtype)
    return torch.einsum(equation, *xs)


def _pad_spatial(call: Call, x: Tensor, pads: Sequence[int], value: float = 0.0) -> Tensor:
    """ONNX pads [b1, b2, ..., e1, e2, ...] on the spatial axes of an N, C, ... tensor."""
    n = len(pads) // 2
    if not any(pads):
        return x
    call.room([*x.shape[:-n], *(size + pads[k] + pads[k + n] for k, size in enumerate(x.shape[-n:]))], x.dtype,
              "its padded input")
    torch_pads: list[int] = []
    for axis in reversed(range(n)):  # F.pad lists the last axis first
        torch_pads += [pads[axis], pads[axis + n]]
    return F.pad(x, torch_pads, value=value)


def _pads(call: Call, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int]:
    """The explicit pads of a Conv or pool: its `pads`, or those that auto_pad computes for this input."""
    nd = len(kernel)
    auto = call.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(call.attr("pads", [0] * 2 * nd)) if auto == "NOTSET" else [0] * 2 * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        call.refuse(f"auto_pad={auto!r} is not an ONNX padding")
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


@op("Conv")
def _conv(call: Call, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        call.refuse(f"a {nd}-D convolution has no torch counterpart")
    strides = call.attr("strides", [1] * nd)
    dilations = call.attr("dilations", [1] * nd)
    x = _pad_spatial(call, x, _pads(call, x, w.shape[2:], strides, dilations))
    function = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    # N x C_out x the spatial sizes (at most the padded input's, stride and dilation >= 1): a wide 1x1 kernel
    # over a large image is their product
    call.room([x.shape[0], w.shape[0], *x.shape[2:]], x.dtype)
    return function(x, w, b, stride=strides, dilation=dilations, groups=call.attr("group", 1))


def _pool_geometry(call: Call, x: Tensor) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = call.attr("kernel_shape")
    nd = len(kernel)
    if nd not in (1, 2, 3):
        call.refuse(f"a {nd}-D pool has no torch counterpart")
    strides = call.attr("strides", [1] * nd)
    dilations = call.attr("dilations", [1] * nd)
    return kernel, strides, dilations, _pads(call, x, kernel, strides, dilations), bool(call.attr("ceil_mode", 0))


@op("MaxPool")
def _max_pool(call: Call, x: Tensor) -> Tensor:
    kernel, strides, dilations, pads, ceil = _pool_geometry(call, x)
    if call.attr("storage_order", 0):
        call.refuse("storage_order=1 is not supported")
    nd = len(kernel)
    x = _pad_spatial(call, x, pads, value=-math.inf)
    return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1](x, kernel, strides, dilation=dilations, ceil_mode=ceil)


@op("AveragePool")
def _average_pool(call: Call, x: Tensor) -> Tensor:
    kernel, strides, dilations, pads, ceil = _pool_geometry(call, x)
    if any(d != 1 for d in dilations):
        call.refuse("AveragePool with dilations has no torch counterpart")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    if call.attr("count_include_pad", 0) or not any(pads):
        return pool(_pad_spatial(call, x, pads), kernel, strides, ceil_mode=ceil)
    # Average over the real pixels only: the padded sum over the padded count of ones.
    ones = _pad_spatial(call, torch.ones_like(x[:1, :1]), pads)
    padded = pool(_pad_spatial(call, x, pads), kernel, strides, ceil_mode=ceil)
    return padded / pool(ones, kernel, strides, ceil_mode=ceil)


@op("GlobalAveragePool")
def _global_average_pool(call: Call, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _global_max_pool(call: Call, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("LRN")
def _lrn(call: Call, x: Tensor) -> Tensor:
    return F.local_response_norm(x, call.attr("size"), call.attr("alpha", 1e-4), call.attr("beta", 0.75),
                                 call.attr("bias", 1.0))
