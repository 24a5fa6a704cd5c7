"""Elementwise ONNX ops for onnxmorph.train: arithmetic, activations, comparisons and logic, casts.

ONNX broadcasting is numpy's, and so is torch's. Where an ONNX op's integer semantics differ from
torch's defaults (Div truncates, Mod follows the divisor's sign unless fmod=1, Pow keeps the base's
type) the function says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxmorph.errors import UsageError
from onnxmorph.train.optable import Call, broadcast, op, torch_dtype

Tensor = torch.Tensor

# ---------------------------------------------------------------- one input, no attribute

# op -> (function, the first opset that has the op)
_UNARY: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {
    "Neg": (torch.neg, 6), "Abs": (torch.abs, 6), "Sqrt": (torch.sqrt, 6), "Exp": (torch.exp, 6),
    "Log": (torch.log, 6), "Erf": (torch.erf, 9), "Sin": (torch.sin, 7), "Cos": (torch.cos, 7), "Tan": (torch.tan, 7),
    "Asin": (torch.asin, 7), "Acos": (torch.acos, 7), "Atan": (torch.atan, 7), "Sinh": (torch.sinh, 9),
    "Cosh": (torch.cosh, 9), "Asinh": (torch.asinh, 9), "Acosh": (torch.acosh, 9), "Atanh": (torch.atanh, 9),
    "Reciprocal": (torch.reciprocal, 6), "Floor": (torch.floor, 6), "Ceil": (torch.ceil, 6),
    # ONNX Round rounds half to even, as torch.round does.
    "Round": (torch.round, 11), "Sign": (torch.sign, 9), "Tanh": (torch.tanh, 6), "Sigmoid": (torch.sigmoid, 6),
    "Relu": (torch.relu, 6), "Softsign": (F.softsign, 1), "HardSwish": (F.hardswish, 14), "Mish": (F.mish, 18),
    "IsNaN": (torch.isnan, 9), "Not": (torch.logical_not, 1), "BitwiseNot": (torch.bitwise_not, 18),
    "Identity": (lambda x: x, 1),
}


def _unary(function: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def apply(call: Call, x: Tensor) -> Tensor:
        return function(x)
    return apply


for _name, (_function, _since) in _UNARY.items():
    op(_name, since=_since)(_unary(_function))


@op("Softplus")
def _softplus(call: Call, x: Tensor) -> Tensor:
    # log(1 + exp(x)) everywhere: F.softplus's default threshold switches to x above 20, which
    # differs from it by less than float32 can show, but only log1p(exp) is ONNX's formula.
    return torch.where(x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20))))


# ---------------------------------------------------------------- activations with attributes


@op("LeakyRelu")
def _leaky_relu(call: Call, x: Tensor) -> Tensor:
    return F.leaky_relu(x, call.attr("alpha", 0.01))


@op("Elu")
def _elu(call: Call, x: Tensor) -> Tensor:
    return F.elu(x, call.attr("alpha", 1.0))


@op("Celu", since=12)
def _celu(call: Call, x: Tensor) -> Tensor:
    return F.celu(x, call.attr("alpha", 1.0))


@op("Selu")
def _selu(call: Call, x: Tensor) -> Tensor:
    alpha, gamma = call.attr("alpha", 1.67326319217681884765625), call.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("HardSigmoid")
def _hard_sigmoid(call: Call, x: Tensor) -> Tensor:
    return torch.clamp(call.attr("alpha", 0.2) * x + call.attr("beta", 0.5), 0, 1)


@op("ThresholdedRelu", since=10)
def _thresholded_relu(call: Call, x: Tensor) -> Tensor:
    return torch.where(x > call.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("Swish", since=24)
def _swish(call: Call, x: Tensor) -> Tensor:
    return x * torch.sigmoid(call.attr("alpha", 1.0) * x)


@op("Gelu", since=20)
def _gelu(call: Call, x: Tensor) -> Tensor:
    approximate = call.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        call.refuse(f"approximate={approximate!r} is not an ONNX Gelu")
    return F.gelu(x, approximate=approximate)


@op("PRelu")
def _prelu(call: Call, x: Tensor, slope: Tensor) -> Tensor:
    _broadcast(call, x, slope)
    return torch.where(x >= 0, x, x * slope)


@op("Clip", since=1)
def _clip_1(call: Call, x: Tensor) -> Tensor:
    return torch.clamp(x, min=call.attr("min", -math.inf), max=call.attr("max", math.inf))


@op("Clip", since=11)
def _clip_11(call: Call, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    # Bounds are scalar tensors; torch.clamp takes them as tensors, keeping their gradient.
    return torch.clamp(x, min=low, max=high)


@op("Dropout", outputs=2)
def _dropout(call: Call, x: Tensor, ratio: Tensor | None = None, training: Tensor | None = None) -> tuple[Tensor, ...]:
    # An exported graph is an inference graph: dropout is the identity and keeps every element.
    if training is not None and bool(training.reshape(-1)[0]):
        call.refuse("training_mode=True dropout is random; export the model in eval mode (model.eval())")
    return x, torch.ones_like(x, dtype=torch.bool)


# ---------------------------------------------------------------- two or more inputs


def _broadcast(call: Call, *xs: Tensor) -> None:
    """Refuse a broadcast whose result is over the size limit ([N, 1] + [1, N] makes N x N from 2N elements)."""
    # The result has at most the product of the inputs' elements: small operands need no sizing (a forward
    # pass runs hundreds of these).
    if math.prod(x.numel() for x in xs) * 8 <= call.max_bytes:
        return
    call.room(broadcast(*(x.shape for x in xs)), max((x.dtype for x in xs), key=lambda d: d.itemsize))


@op("Add", since=7)
def _add(call: Call, a: Tensor, b: Tensor) -> Tensor:
    _broadcast(call, a, b)
    return a + b


@op("Sub", since=7)
def _sub(call: Call, a: Tensor, b: Tensor) -> Tensor:
    _broadcast(call, a, b)
    return a - b


@op("Mul", since=7)
def _mul(call: Call, a: Tensor, b: Tensor) -> Tensor:
    _broadcast(call, a, b)
    return a * b


@op("Div", since=7)
def _div(call: Call, a: Tensor, b: Tensor) -> Tensor:
    # Integer Div truncates toward zero (shape arithmetic such as width // heads), float Div does not.
    _broadcast(call, a, b)
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow", since=7)
def _pow(call: Call, base: Tensor, exponent: Tensor) -> Tensor:
    # The output has the base's type whatever the exponent's (x ** 2 with an integer 2, say).
    _broadcast(call, base, exponent)
    if base.dtype.is_floating_point:
        return torch.pow(base, exponent.to(base.dtype))
    return torch.pow(base, exponent).to(base.dtype)


@op("Mod", since=10)
def _mod(call: Call, a: Tensor, b: Tensor) -> Tensor:
    _broadcast(call, a, b)
    if call.attr("fmod", 0):
        return torch.fmod(a, b)
    if a.dtype.is_floating_point:
        call.refuse("fmod=0 on floats is not a valid ONNX Mod")
    return torch.remainder(a, b)  # the sign of the divisor, as Python's %


def _fold(function: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def apply(call: Call, *xs: Tensor) -> Tensor:
        _broadcast(call, *xs)
        out = xs[0]
        for x in xs[1:]:
            out = function(out, x)
        return out
    return apply


# Max and Min split the gradient equally between tied inputs (torch.maximum does), as the mean of
# the subgradients would.
op("Max", since=8)(_fold(torch.maximum))
op("Min", since=8)(_fold(torch.minimum))
op("Sum", since=8)(_fold(torch.add))


@op("Mean", since=8)
def _mean(call: Call, *xs: Tensor) -> Tensor:
    return _fold(torch.add)(call, *xs) / len(xs)


# op -> (function, the first opset with numpy broadcasting)
_BINARY: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], int]] = {
    "Equal": (torch.eq, 7), "Less": (torch.lt, 7), "LessOrEqual": (torch.le, 12), "Greater": (torch.gt, 7),
    "GreaterOrEqual": (torch.ge, 12), "And": (torch.logical_and, 7), "Or": (torch.logical_or, 7),
    "Xor": (torch.logical_xor, 7), "BitwiseAnd": (torch.bitwise_and, 18), "BitwiseOr": (torch.bitwise_or, 18),
    "BitwiseXor": (torch.bitwise_xor, 18),
}


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def apply(call: Call, a: Tensor, b: Tensor) -> Tensor:
        _broadcast(call, a, b)
        return function(a, b)
    return apply


for _name, (_function, _since) in _BINARY.items():
    op(_name, since=_since)(_binary(_function))


@op("Where", since=9)
def _where(call: Call, condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    _broadcast(call, condition, x, y)
    return torch.where(condition.to(torch.bool), x, y)


@op("IsInf", since=10)
def _isinf(call: Call, x: Tensor) -> Tensor:
    positive, negative = call.attr("detect_positive", 1), call.attr("detect_negative", 1)
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# ---------------------------------------------------------------- types


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    # Float to bool is "not zero" in ONNX and torch alike; float to integer truncates in both.
    return x if x.dtype == dtype else x.to(dtype)


@op("Cast", since=6)
def _cast_op(call: Call, x: Tensor) -> Tensor:
    try:
        target = torch_dtype(call.attr("to"))
    except UsageError as error:
        call.refuse(str(error))
    return _cast(x, target)


@op("CastLike", since=15)
def _cast_like(call: Call, x: Tensor, like: Tensor) -> Tensor:
    return _cast(x, like.dtype)
