"""Element types of weights: which are floats (bfloat16 too, whose numpy kind is "V") and what they compute in."""

from __future__ import annotations

import numpy as np

# numpy types of floats that numpy does not know as such (ml_dtypes' types, as onnx maps them)
_EXTRA_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
                 "float4_e2m1fn")


# ONNX element types of floats (TensorProto.FLOAT, FLOAT16, DOUBLE, BFLOAT16, the float8 and float4 types):
# onnx-graphsurgeon gives a tensor of a type numpy lacks (bfloat16) this number as its dtype.
_ONNX_FLOATS = frozenset((1, 10, 11, 16, 17, 18, 19, 20, 23, 24))


def is_float(dtype: np.dtype | type | str | int) -> bool:
    """Whether `dtype` is a floating-point type: numpy's, bfloat16 and the float8 types of ml_dtypes, or the
    ONNX element type number of one."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype) in _ONNX_FLOATS
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name in _EXTRA_FLOATS


def compute_dtype(dtype: np.dtype | type | str) -> np.dtype:
    """The type arithmetic on values of `dtype` is done in: float32 for floats under 32 bits, else its own.

    numpy has no float16 kernels of its own (it converts element by element) and ml_dtypes' bfloat16
    is slower still; float32 holds both exactly, and a result rounded back to the weight's type is
    what arithmetic in that type would give (to one rounding).
    """
    dtype = np.dtype(dtype)
    if is_float(dtype) and dtype.itemsize < 4:
        return np.dtype(np.float32)
    if dtype.kind in "fc":
        return dtype
    return np.dtype(np.float64)  # integer per-channel constants: exact in float64 for what they hold
