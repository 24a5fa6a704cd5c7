"""Normalisations for onnxmorph.train: BatchNormalization (inference form), LayerNormalization,
RMSNormalization, onnxruntime's SimplifiedLayerNormalization, GroupNormalization, InstanceNormalization.

The statistics are computed in float32 for a float16/bfloat16 input when stash_type is 1 (the default), as
onnxruntime does, and the result is cast back to the input's type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxmorph.train.optable import Call, op

Tensor = torch.Tensor

FLOAT = 1  # ONNX's stash_type for float32 statistics


def _stashed(call: Call, x: Tensor) -> Tensor:
    if call.attr("stash_type", FLOAT) == FLOAT and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@op("BatchNormalization")
def _batch_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    if call.attr("training_mode", 0) or call.outputs > 1 and any(call.wants(k) for k in range(1, call.outputs)):
        call.refuse("training-mode BatchNormalization (running statistics as outputs) is not supported; "
                    "export the model in eval mode")
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + call.attr("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


@op("InstanceNormalization")
def _instance_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=call.attr("epsilon", 1e-5))


@op("LayerNormalization", since=17, outputs=3)
def _layer_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> tuple[Tensor, ...]:
    axis = call.attr("axis", -1) % x.dim()
    eps = call.attr("epsilon", 1e-5)
    stats = _stashed(call, x)
    dims = list(range(axis, x.dim()))
    mean = stats.mean(dim=dims, keepdim=True)
    centred = stats - mean
    inv_std = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + eps)
    if stats is x and call.outputs == 1:
        y = F.layer_norm(x, x.shape[axis:], eps=eps)  # one fused kernel when the statistics are not wanted
    else:
        y = (centred * inv_std).to(x.dtype)
    y = y * scale
    y = y if bias is None else y + bias
    return y, mean, inv_std


def _rms(call: Call, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    axis = call.attr("axis", -1) % x.dim()
    stats = _stashed(call, x)
    dims = list(range(axis, x.dim()))
    inv = torch.rsqrt((stats * stats).mean(dim=dims, keepdim=True) + call.attr("epsilon", 1e-5))
    return (stats * inv).to(x.dtype) * scale, inv


@op("RMSNormalization", since=23)
def _rms_norm(call: Call, x: Tensor, scale: Tensor) -> Tensor:
    return _rms(call, x, scale)[0]


# onnxruntime's fusion of the same formula, which its optimizer writes in the ONNX domain.
@op("SimplifiedLayerNormalization", outputs=2)
def _simplified_layer_norm(call: Call, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return _rms(call, x, scale)


def _group_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor, per_group: bool) -> Tensor:
    groups = call.attr("num_groups")
    stats = _stashed(call, x)
    n, c = x.shape[:2]
    grouped = stats.reshape(n, groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    centred = grouped - mean
    y = (centred * torch.rsqrt((centred * centred).mean(dim=-1, keepdim=True) + call.attr("epsilon", 1e-5)))
    y = y.reshape(x.shape).to(x.dtype)
    if per_group:  # opset 18: one scale and bias per group, repeated over its channels
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    shape = [1, c] + [1] * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@op("GroupNormalization", since=18)
def _group_norm_18(call: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return _group_norm(call, x, scale, bias, per_group=True)


@op("GroupNormalization", since=21)
def _group_norm_21(call: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return _group_norm(call, x, scale, bias, per_group=False)
