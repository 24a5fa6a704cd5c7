"""Every op of onnxmorph.train's table, one node at a time, against onnxruntime; gradients against finite differences.

Each case is a one-node model whose inputs are all fed (so nothing is folded away); onnxruntime runs it
with graph optimisations off, `to_torch` runs it, and the outputs must agree (float32: atol 1e-5,
rtol 1e-4; integers and booleans exactly; NaN where onnxruntime has NaN). Where the output is a float
that depends on float inputs, `torch.autograd.gradcheck` compares the module's gradients with finite
differences in float64. A test checks that every op and every opset variant of the table has a case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxmorph import train as ot  # noqa: E402
from onnxmorph.errors import UsageError  # noqa: E402
from onnxmorph.train import optable  # noqa: E402
from onnxmorph.train.ops import resolve  # noqa: E402

torch.set_num_threads(1)

RNG = np.random.default_rng(0)


def f32(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def i64(values: Any) -> np.ndarray:
    return np.asarray(values, np.int64)


@dataclass
class Case:
    """A one-node model: `inputs` in order (None: omitted), all fed; `outputs` named outputs ("" for a skipped one)."""

    op: str
    inputs: list[np.ndarray | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: int | list[str] = 1
    grad: bool = True  # gradcheck the float inputs (skipped when the first output is not a float)
    grad_inputs: tuple[int, ...] | None = None  # which inputs to gradcheck (None: every float input)
    ort_atol: float = 1e-5


UNARY = {
    "Neg": f32(3, 4), "Abs": f32(3, 4), "Sqrt": f32(3, 4, low=0.1, high=2), "Exp": f32(3, 4), "Log": f32(3, 4, low=0.1),
    "Erf": f32(3, 4), "Sin": f32(3, 4, low=-4, high=4), "Cos": f32(3, 4, low=-4, high=4), "Tan": f32(3, 4),
    "Asin": f32(3, 4, low=-0.9, high=0.9), "Acos": f32(3, 4, low=-0.9, high=0.9), "Atan": f32(3, 4),
    "Sinh": f32(3, 4), "Cosh": f32(3, 4), "Asinh": f32(3, 4), "Acosh": f32(3, 4, low=1.1, high=3),
    "Atanh": f32(3, 4, low=-0.9, high=0.9), "Reciprocal": f32(3, 4, low=0.5, high=2),
    "Floor": f32(3, 4, low=-3, high=3), "Ceil": f32(3, 4, low=-3, high=3),
    "Round": np.array([[-2.5, -1.5, -0.5, 0.5], [1.5, 2.5, 0.49, -0.51]], np.float32),
    "Sign": np.array([[-2.0, 0.0, 3.0]], np.float32), "Tanh": f32(3, 4), "Sigmoid": f32(3, 4), "Relu": f32(3, 4),
    "Softsign": f32(3, 4), "HardSwish": f32(3, 4, low=-4, high=4), "Mish": f32(3, 4, low=-3, high=3),
    "Softplus": np.concatenate([f32(2, 4, low=-3, high=3), np.array([[25.0, -30.0, 19.9, 21.0]], np.float32)]),
    "Identity": f32(3, 4),
    "IsNaN": np.array([1.0, np.nan, -np.inf], np.float32), "Not": np.array([True, False]),
    "BitwiseNot": i64([[0, 5, -3]]),
}
_X = f32(2, 3, 4)
_W = f32(3, 4)
_INTS = i64([[-7, 7, 9], [-9, 4, 0]])
_Q, _K, _V = f32(2, 4, 5, 8), f32(2, 2, 6, 8), f32(2, 2, 6, 8)
_MASK = np.ones((2, 1, 5, 6), bool)
_MASK[1, 0, 2, :] = False  # a query row with no key: zeros, not NaN
_MASK[0, 0, :, 4:] = False
_CACHE = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) * 0.1

CASES: dict[str, Case] = {
    **{op: Case(op, [x], opset=18 if op in ("Mish", "BitwiseNot") else 17,
                grad=op not in ("Round", "Sign", "Floor", "Ceil")) for op, x in UNARY.items()},
    # ---- activations with attributes
    "LeakyRelu": Case("LeakyRelu", [f32(3, 4)], {"alpha": 0.2}),
    "Elu": Case("Elu", [f32(3, 4)], {"alpha": 0.7}),
    "Celu": Case("Celu", [f32(3, 4)], {"alpha": 0.7}),
    "Selu": Case("Selu", [f32(3, 4)]),
    "HardSigmoid": Case("HardSigmoid", [f32(3, 4, low=-4, high=4)], {"alpha": 0.3, "beta": 0.4}),
    "ThresholdedRelu": Case("ThresholdedRelu", [f32(3, 4, low=-2, high=2)], {"alpha": 0.5}),
    "Swish": Case("Swish", [f32(3, 4, low=-3, high=3)], {"alpha": 1.5}, opset=24),
    "Gelu": Case("Gelu", [f32(3, 4, low=-3, high=3)], opset=20),
    "Gelu tanh": Case("Gelu", [f32(3, 4, low=-3, high=3)], {"approximate": "tanh"}, opset=20),
    "PRelu broadcast slope": Case("PRelu", [_X, f32(3, 1)]),
    "Clip attributes (opset 6)": Case("Clip", [f32(3, 4)], {"min": -0.5, "max": 0.3}, opset=6),
    "Clip inputs": Case("Clip", [f32(3, 4), np.array(-0.5, np.float32), np.array(0.3, np.float32)]),
    "Clip only max": Case("Clip", [f32(3, 4), None, np.array(0.3, np.float32)]),
    "Dropout (inference)": Case("Dropout", [f32(3, 4)], outputs=2),
    # ---- binary and variadic
    "Add broadcast": Case("Add", [_X, f32(4)]),
    "Sub broadcast": Case("Sub", [f32(3, 1), _X]),
    "Mul broadcast": Case("Mul", [_X, f32(2, 1, 1)]),
    "Div float": Case("Div", [_X, f32(4, low=0.5, high=2)]),
    "Div integer truncates": Case("Div", [_INTS, i64([2, -2, 4])]),
    "Pow float exponent": Case("Pow", [f32(3, 4, low=0.2, high=2), f32(3, 4)]),
    "Pow integer exponent": Case("Pow", [f32(3, 4), i64(2)]),
    # d/d(exponent) of a negative base's power is undefined: the base's gradient only.
    "Pow negative base cube": Case("Pow", [f32(3, 4), np.array(3.0, np.float32)], grad_inputs=(0,)),
    "Mod integer (sign of divisor)": Case("Mod", [_INTS, i64([2, -3, 4])]),
    "Mod fmod float": Case("Mod", [f32(3, 4, low=-5, high=5), np.array([1.5, -2.0, 0.7, 3.0], np.float32)],
                           {"fmod": 1}),
    "Mod fmod integer": Case("Mod", [_INTS, i64([2, -3, 4])], {"fmod": 1}),
    "Max of three": Case("Max", [_X, f32(1, 3, 1), np.array(0.1, np.float32)]),
    "Min of two": Case("Min", [_X, f32(4)]),
    "Sum of three": Case("Sum", [_X, f32(4), f32(3, 1)]),
    "Mean of two": Case("Mean", [_X, f32(4)]),
    "Equal": Case("Equal", [_INTS, i64([-7, 4, 9])]),
    "Less": Case("Less", [_X, f32(4)]),
    "LessOrEqual": Case("LessOrEqual", [_INTS, i64([-7, 4, 9])]),
    "Greater": Case("Greater", [_X, f32(4)]),
    "GreaterOrEqual": Case("GreaterOrEqual", [_INTS, i64([-7, 4, 9])]),
    "And": Case("And", [np.array([[True, False], [True, True]]), np.array([True, False])]),
    "Or": Case("Or", [np.array([[True, False], [False, False]]), np.array([False, True])]),
    "Xor": Case("Xor", [np.array([[True, False], [False, True]]), np.array([True, False])]),
    "BitwiseAnd": Case("BitwiseAnd", [_INTS, i64([6, 3, 5])], opset=18),
    "BitwiseOr": Case("BitwiseOr", [_INTS, i64([6, 3, 5])], opset=18),
    "BitwiseXor": Case("BitwiseXor", [_INTS, i64([6, 3, 5])], opset=18),
    "Where broadcast": Case("Where", [_X > 0, _X, np.array(-2.5, np.float32)]),
    "Where -inf": Case("Where", [_X > 0, _X, np.array(-np.inf, np.float32)], grad=False),
    "IsInf both": Case("IsInf", [np.array([1.0, np.inf, -np.inf, np.nan], np.float32)]),
    "IsInf negative only": Case("IsInf", [np.array([1.0, np.inf, -np.inf], np.float32)], {"detect_positive": 0}),
    "Cast float to int64 truncates": Case("Cast", [f32(3, 4, low=-5, high=5)], {"to": TensorProto.INT64}, grad=False),
    "Cast float to float16": Case("Cast", [f32(3, 4)], {"to": TensorProto.FLOAT16}, grad=False),
    "Cast int to bool": Case("Cast", [_INTS], {"to": TensorProto.BOOL}),
    "CastLike": Case("CastLike", [_INTS, np.zeros(1, np.float32)], opset=15, grad=False),
    # ---- shapes and data movement
    "Constant": Case("Constant", [], {"value": numpy_helper.from_array(f32(2, 3))}),
    "Constant value_ints": Case("Constant", [], {"value_ints": [3, -1, 4]}),
    "ConstantOfShape": Case("ConstantOfShape", [i64([2, 3])],
                            {"value": numpy_helper.from_array(np.array([-np.inf], np.float32))}),
    "ConstantOfShape default zeros": Case("ConstantOfShape", [i64([2, 0, 3])]),
    "Shape": Case("Shape", [_X]),
    "Shape start end (opset 15)": Case("Shape", [_X], {"start": -2, "end": 9}, opset=15),
    "Size": Case("Size", [_X]),
    "Range integer": Case("Range", [i64(2), i64(11), i64(3)]),
    "Range float negative step": Case("Range", [np.array(1.5, np.float32), np.array(-2.0, np.float32),
                                                np.array(-0.7, np.float32)], grad=False),
    "Reshape with 0 and -1": Case("Reshape", [_X, i64([0, -1])]),
    "Reshape allowzero": Case("Reshape", [np.zeros((0, 3), np.float32), i64([3, 0])], {"allowzero": 1}, opset=14,
                                 grad=False),
    "Flatten": Case("Flatten", [_X], {"axis": 2}),
    "Flatten negative axis": Case("Flatten", [_X], {"axis": -1}),
    "Transpose": Case("Transpose", [_X], {"perm": [2, 0, 1]}),
    "Transpose default": Case("Transpose", [_X]),
    "Squeeze attribute (opset 11)": Case("Squeeze", [f32(1, 3, 1, 2)], {"axes": [-2, 0]}, opset=11),
    "Squeeze input": Case("Squeeze", [f32(1, 3, 1, 2), i64([2])]),
    "Squeeze all": Case("Squeeze", [f32(1, 3, 1, 2)]),
    "Unsqueeze attribute (opset 11)": Case("Unsqueeze", [f32(3, 2)], {"axes": [0, -1]}, opset=11),
    "Unsqueeze input": Case("Unsqueeze", [f32(3, 2), i64([-1, 1])]),
    "Concat negative axis": Case("Concat", [_X, f32(2, 3, 2)], {"axis": -1}),
    "Concat with empty shape piece": Case("Concat", [i64([2, 3]), np.zeros(0, np.int64), i64([4])], {"axis": 0}),
    "Split attribute (opset 11)": Case("Split", [_X], {"axis": 2, "split": [1, 3]}, opset=11, outputs=2),
    "Split input": Case("Split", [_X, i64([1, 2])], {"axis": 1}, outputs=2),
    "Split equal": Case("Split", [_X], {"axis": -1}, outputs=2),
    "Split num_outputs uneven (opset 18)": Case("Split", [f32(2, 5)], {"axis": 1, "num_outputs": 3}, opset=18,
                                                outputs=3),
    "Expand both ways": Case("Expand", [f32(3, 1), i64([2, 1, 4])]),
    "Tile": Case("Tile", [_X, i64([1, 2, 1])]),
    "Trilu lower k=1": Case("Trilu", [_X, i64(1)], {"upper": 0}),
    "Trilu upper k=-1": Case("Trilu", [_X, i64(-1)]),
    "Trilu upper": Case("Trilu", [_X]),
    "Gather negative 2-D indices": Case("Gather", [_X, i64([[-1, 0], [2, 1]])], {"axis": 1}),
    "Gather scalar index": Case("Gather", [_X, i64(-2)], {"axis": 2}),
    "GatherElements": Case("GatherElements", [_X, i64(RNG.integers(-4, 4, (2, 3, 2)))], {"axis": -1}),
    "GatherND": Case("GatherND", [_X, i64([[1, -1], [0, 2]])]),
    "GatherND batch_dims": Case("GatherND", [_X, i64([[[2], [0]], [[-1], [1]]])], {"batch_dims": 1}),
    "GatherND full index": Case("GatherND", [_X, i64([[1, 2, 3], [0, 0, -1]])]),
    "ScatterND": Case("ScatterND", [_X, i64([[1, 0], [0, 2]]), f32(2, 4)]),
    "ScatterND add": Case("ScatterND", [_X, i64([[1, 0], [1, 0]]), f32(2, 4)], {"reduction": "add"}, opset=16),
    "ScatterElements": Case("ScatterElements", [_X, i64([[[0, 1], [2, 3], [1, 0]]] * 2), f32(2, 3, 2)],
                            {"axis": 2}),
    "ScatterElements add": Case("ScatterElements", [_X, i64([[[0, 0], [3, 3], [1, 1]]] * 2), f32(2, 3, 2)],
                                {"axis": 2, "reduction": "add"}, opset=16),
    "Slice attributes (opset 9)": Case("Slice", [_X], {"starts": [1, -3], "ends": [9_000_000, -1], "axes": [0, 2]},
                                       opset=9),
    "Slice clamped ends": Case("Slice", [_X, i64([1, -3]), i64([9_000_000_000, -1]), i64([0, 2])]),
    "Slice negative steps": Case("Slice", [_X, i64([-1, 9]), i64([-9_000_000_000, 0]), i64([0, 2]), i64([-1, -2])]),
    "Slice step 2": Case("Slice", [_X, i64([0]), i64([4]), i64([-1]), i64([2])]),
    "Slice empty": Case("Slice", [_X, i64([2]), i64([1]), i64([2])]),
    "OneHot": Case("OneHot", [i64([[0, 3], [-1, 7]]), i64(5), np.array([-1.0, 2.0], np.float32)], {"axis": 1}),
    "NonZero": Case("NonZero", [np.array([[1.0, 0.0, 2.0], [0.0, 0.0, -1.0]], np.float32)]),
    "EyeLike": Case("EyeLike", [f32(3, 5)], {"k": 1}),
    "Pad constant (opset 10)": Case("Pad", [_X], {"pads": [0, 1, 2, 0, 0, 1], "value": 0.5}, opset=10),
    "Pad constant input": Case("Pad", [_X, i64([0, 1, 2, 0, 0, -1]), np.array(0.5, np.float32)], opset=11),
    "Pad reflect": Case("Pad", [_X, i64([0, 2, 3, 0, 1, 3])], {"mode": "reflect"}, opset=11),
    "Pad edge with axes": Case("Pad", [_X, i64([2, 1, 1, 3]), None, i64([-1, 1])], {"mode": "edge"}, opset=18),
    "Pad wrap": Case("Pad", [_X, i64([0, 1, 2, 0, 2, 1])], {"mode": "wrap"}, opset=19),
    # ---- reductions and ops along an axis
    "ReduceSum attribute (opset 11)": Case("ReduceSum", [_X], {"axes": [0, -1], "keepdims": 0}, opset=11),
    "ReduceSum input": Case("ReduceSum", [_X, i64([1])]),
    "ReduceSum all": Case("ReduceSum", [_X], {"keepdims": 0}),
    "ReduceSum noop": Case("ReduceSum", [_X, np.zeros(0, np.int64)], {"noop_with_empty_axes": 1}),
    "ReduceMean attribute": Case("ReduceMean", [_X], {"axes": [-1]}),
    "ReduceMean input (opset 18)": Case("ReduceMean", [_X, i64([0, 2])], {"keepdims": 0}, opset=18),
    "ReduceMax attribute": Case("ReduceMax", [_X], {"axes": [1]}),
    "ReduceMax input (opset 18)": Case("ReduceMax", [_X, i64([-1])], {"keepdims": 0}, opset=18),
    "ReduceMin attribute": Case("ReduceMin", [_X], {"axes": [1]}),
    "ReduceMin input (opset 18)": Case("ReduceMin", [_X, i64([-1])], opset=18),
    "ReduceProd attribute": Case("ReduceProd", [_X], {"axes": [0, 2]}),
    "ReduceProd input (opset 18)": Case("ReduceProd", [_X, i64([1])], opset=18),
    "ReduceL1 attribute": Case("ReduceL1", [_X], {"axes": [2]}),
    "ReduceL1 input (opset 18)": Case("ReduceL1", [_X, i64([2])], opset=18),
    "ReduceL2 attribute": Case("ReduceL2", [_X], {"axes": [2]}),
    "ReduceL2 input (opset 18)": Case("ReduceL2", [_X, i64([2])], opset=18),
    "ReduceSumSquare attribute": Case("ReduceSumSquare", [_X], {"axes": [2]}),
    "ReduceSumSquare input (opset 18)": Case("ReduceSumSquare", [_X, i64([2])], opset=18),
    "ReduceLogSum attribute": Case("ReduceLogSum", [f32(2, 3, low=0.1)], {"axes": [1]}),
    "ReduceLogSum input (opset 18)": Case("ReduceLogSum", [f32(2, 3, low=0.1), i64([1])], opset=18),
    "ReduceLogSumExp attribute": Case("ReduceLogSumExp", [_X], {"axes": [1]}),
    "ReduceLogSumExp input (opset 18)": Case("ReduceLogSumExp", [_X, i64([1])], opset=18),
    "ArgMax": Case("ArgMax", [_X], {"axis": -1, "keepdims": 0}),
    "ArgMax last index": Case("ArgMax", [np.array([[1.0, 3.0, 3.0, 0.0]], np.float32)],
                              {"axis": 1, "select_last_index": 1}),
    "ArgMin": Case("ArgMin", [_X], {"axis": 1}),
    "CumSum": Case("CumSum", [_X, i64(1)]),
    "CumSum exclusive reverse": Case("CumSum", [_X, i64(-1)], {"exclusive": 1, "reverse": 1}),
    "TopK attribute (opset 1)": Case("TopK", [f32(3, 6)], {"k": 2}, opset=1, outputs=2),
    "TopK smallest with ties": Case("TopK", [np.array([[3.0, 1.0, 2.0, 1.0, 1.0, 0.5]], np.float32), i64([3])],
                                    {"largest": 0, "axis": 1}, opset=11, outputs=2, grad=False),
    "TopK largest axis 0": Case("TopK", [f32(5, 3), i64([2])], {"axis": 0}, opset=11, outputs=2),
    "Softmax": Case("Softmax", [_X], {"axis": 1}),
    "Softmax coerced 2-D (opset 11)": Case("Softmax", [_X], {"axis": 1}, opset=11),
    "LogSoftmax": Case("LogSoftmax", [_X]),
    "Hardmax": Case("Hardmax", [_X], {"axis": 1}),
    # ---- layers
    "MatMul batched": Case("MatMul", [_X, f32(4, 5)]),
    "MatMul broadcast batch": Case("MatMul", [f32(2, 1, 3, 4), f32(3, 4, 2)]),
    "Gemm transposed": Case("Gemm", [f32(4, 3), f32(5, 4), f32(5)], {"transA": 1, "transB": 1, "alpha": 0.5,
                                                                     "beta": 2.0}),
    "Gemm no bias": Case("Gemm", [f32(3, 4), f32(4, 5)]),
    "Einsum": Case("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij, bjk -> bik"}),
    "Conv padded strided grouped": Case("Conv", [f32(2, 4, 7, 6), f32(6, 2, 3, 2), f32(6)],
                                        {"pads": [1, 0, 1, 1], "strides": [2, 1], "group": 2, "dilations": [1, 2]}),
    "Conv SAME_UPPER": Case("Conv", [f32(1, 2, 7, 6), f32(3, 2, 2, 3)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "Conv SAME_LOWER 1-D": Case("Conv", [f32(1, 2, 7), f32(3, 2, 4)], {"auto_pad": "SAME_LOWER"}),
    "MaxPool padded": Case("MaxPool", [f32(1, 2, 6, 5)], {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1],
                                                          "strides": [2, 1]}),
    "MaxPool SAME_UPPER ceil": Case("MaxPool", [f32(1, 2, 7, 7)], {"kernel_shape": [2, 2], "strides": [2, 2],
                                                                   "auto_pad": "SAME_UPPER"}),
    "AveragePool excluding pads": Case("AveragePool", [f32(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                                          "strides": [2, 2]}),
    "AveragePool including pads": Case("AveragePool", [f32(1, 2, 5, 5)],
                                       {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "GlobalAveragePool": Case("GlobalAveragePool", [f32(2, 3, 4, 5)]),
    "GlobalMaxPool": Case("GlobalMaxPool", [f32(2, 3, 4, 5)]),
    "LRN": Case("LRN", [f32(1, 5, 3, 3)], {"size": 3, "alpha": 0.01, "beta": 0.7, "bias": 1.5}),
    # ---- normalisations
    "BatchNormalization": Case("BatchNormalization", [f32(2, 3, 4), f32(3), f32(3), f32(3), f32(3, low=0.5, high=2)],
                               {"epsilon": 1e-3}),
    "InstanceNormalization": Case("InstanceNormalization", [f32(2, 3, 5), f32(3), f32(3)], {"epsilon": 1e-3}),
    "LayerNormalization": Case("LayerNormalization", [_X, f32(4), f32(4)]),
    "LayerNormalization axis 1, no bias, statistics": Case("LayerNormalization", [_X, f32(3, 4)], {"axis": 1},
                                                           outputs=3),
    "RMSNormalization": Case("RMSNormalization", [_X, f32(4)], {"epsilon": 1e-3}, opset=23),
    "RMSNormalization two axes": Case("RMSNormalization", [_X, f32(3, 4)], {"axis": -2}, opset=23),
    "SimplifiedLayerNormalization": Case("SimplifiedLayerNormalization", [_X, f32(4)], {"epsilon": 1e-3}),
    "GroupNormalization per group (opset 18)": Case("GroupNormalization", [f32(2, 4, 3), f32(2), f32(2)],
                                                    {"num_groups": 2}, opset=18),
    "GroupNormalization per channel (opset 21)": Case("GroupNormalization", [f32(2, 4, 3), f32(4), f32(4)],
                                                      {"num_groups": 2}, opset=21),
    # ---- attention
    "Attention grouped heads, boolean mask, dead row": Case("Attention", [_Q, _K, _V, _MASK], opset=23),
    "Attention float mask, scale, softcap": Case("Attention", [_Q, _K, _V, f32(5, 6)],
                                                 {"scale": 0.2, "softcap": 1.5}, opset=23),
    "Attention causal 3-D": Case("Attention", [f32(2, 5, 32), f32(2, 5, 16), f32(2, 5, 16)],
                                 {"is_causal": 1, "q_num_heads": 4, "kv_num_heads": 2}, opset=23),
    "Attention past keys, causal, all outputs": Case("Attention", [f32(1, 2, 3, 4), f32(1, 2, 3, 4), f32(1, 2, 3, 4),
                                                                   None, f32(1, 2, 2, 4), f32(1, 2, 2, 4)],
                                                     {"is_causal": 1, "qk_matmul_output_mode": 3}, opset=23,
                                                     outputs=4),
    "Attention qk output with bias": Case("Attention", [_Q, _K, _V, f32(2, 1, 5, 6)], {"qk_matmul_output_mode": 2},
                                          opset=23, outputs=["y", "", "", "qk"]),
    "RotaryEmbedding 4-D with positions": Case("RotaryEmbedding", [f32(2, 3, 5, 8), np.cos(_CACHE), np.sin(_CACHE),
                                                                   i64([[0, 1, 2, 3, 4], [7, 3, 9, 0, 15]])], opset=23),
    "RotaryEmbedding 3-D interleaved partial": Case("RotaryEmbedding", [f32(2, 5, 24), np.cos(f32(2, 5, 2) * 3),
                                                                        np.sin(f32(2, 5, 2) * 3)],
                                                    {"num_heads": 2, "interleaved": 1, "rotary_embedding_dim": 4},
                                                    opset=23),
}


def _model(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    names = [f"in{k}" if x is not None else "" for k, x in enumerate(case.inputs)]
    outputs = case.outputs if isinstance(case.outputs, list) else [f"out{k}" for k in range(case.outputs)]
    node = helper.make_node(case.op, names, outputs, name="node", **case.attrs)
    feeds = {n: x for n, x in zip(names, case.inputs) if x is not None}
    graph = helper.make_graph(
        [node], "single",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape) for n, x in feeds.items()],
        [helper.make_value_info(name, onnx.TypeProto()) for name in outputs if name])
    opset = [helper.make_opsetid("", case.opset)]
    return helper.make_model(graph, opset_imports=opset, ir_version=helper.find_min_ir_version_for(opset)), feeds


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    case = CASES[name]
    model, feeds = _model(case)
    expected = _ort(model, feeds)
    net = ot.to_torch(model)
    with torch.no_grad():
        got = [t.numpy() for t in _outputs(net(**{k: torch.from_numpy(v) for k, v in feeds.items()}))]
    assert len(got) == len(expected), name
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, (name, k, g.dtype, e.dtype, g.shape, e.shape)
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=case.ort_atol, err_msg=f"{name} output {k}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{name} output {k}")


# Ops whose outputs are indices, sizes or booleans: nothing to differentiate.
DISCRETE = {"ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsInf", "IsNaN",
            "NonZero", "Shape", "Size"}
GRADIENT_CASES = sorted(name for name, case in CASES.items() if case.grad and case.op not in DISCRETE and any(
    x is not None and x.dtype == np.float32 for x in case.inputs))


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_op_gradients_match_finite_differences(name: str) -> None:
    case = CASES[name]
    model, feeds = _model(case)
    net = ot.to_torch(model)
    floats = [f"in{k}" for k, x in enumerate(case.inputs) if x is not None and x.dtype == np.float32
              and (case.grad_inputs is None or k in case.grad_inputs)]
    args = {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    assert _outputs(net(**args))[0].dtype.is_floating_point, "a discrete op: list it in DISCRETE"

    def function(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = _outputs(net(**{**args, **dict(zip(floats, xs))}))
        return tuple(o for o in out if o.dtype.is_floating_point)

    inputs = tuple(args[k].clone().requires_grad_(True) for k in floats)
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_every_op_variant_of_the_table_has_a_case() -> None:
    covered: set[tuple[str, int]] = set()
    for case in CASES.values():
        node = helper.make_node(case.op, [], [])
        covered.add((case.op, resolve(node, case.opset).since))
    table = {(op_type, v.since) for domain, op_type in optable.registered() for v in optable.variants(domain, op_type)}
    assert table - covered == set()
    assert {op for op, _ in table} == set(ot.SUPPORTED_OPS)


# ---- what is refused, in one line that says what to do


def _graph(nodes: list[onnx.NodeProto], opset: int = 17, **kwargs: Any) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_value_info(nodes[-1].output[0], onnx.TypeProto())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *kwargs.get("extra", [])])


REFUSALS = {
    "control flow": ([helper.make_node("If", ["c"], ["y"], name="branch")],
                     r"cannot run If \(node 'branch'\): control flow .* use_cache=False"),
    "contrib op": ([helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fused", domain="com.microsoft")],
                   r"cannot run com.microsoft:FusedMatMul \(node 'fused'\): an onnxruntime contrib op .* before "
                   r"optimizing"),
    "quantized": ([helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="dq")],
                  r"cannot run DequantizeLinear .* train the float model, then quantize"),
    "unknown op": ([helper.make_node("Unique", ["x"], ["y"], name="u"), helper.make_node("Unique", ["y"], ["z"])],
                   r"cannot run Unique \(node 'u' and 1 more\): not among the ops .* docs/training.md"),
    "several ops": ([helper.make_node("Unique", ["x"], ["y"], name="u"), helper.make_node("STFT", ["y"], ["z"])],
                    r"cannot run Unique .* \(also STFT\)$"),
    "sequences": ([helper.make_node("SplitToSequence", ["x"], ["y"], name="s")], r"sequence-typed .* dynamo=True"),
    "random": ([helper.make_node("RandomNormalLike", ["x"], ["y"], name="r")], r"model.eval\(\)"),
    "unsupported output": ([helper.make_node("MaxPool", ["x"], ["y", "indices"], name="pool", kernel_shape=[1])],
                           r"cannot run MaxPool \(node 'pool'\): output 1 \(indices\) is not supported"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_what_cannot_run_is_refused_in_one_line(name: str) -> None:
    nodes, message = REFUSALS[name]
    with pytest.raises(UsageError, match=message) as error:
        ot.to_torch(_graph(nodes, extra=[helper.make_opsetid("com.microsoft", 1)]))
    assert "\n" not in str(error.value)


def test_an_op_older_than_the_table_names_the_converter() -> None:
    model = _graph([helper.make_node("Add", ["x", "x"], ["y"], name="add")], opset=6)
    with pytest.raises(UsageError, match=r"runs Add from opset 7, the model is at opset 6; .*convert_version"):
        ot.to_torch(model)


def test_bad_attributes_are_refused_naming_the_node() -> None:
    model, feeds = _model(Case("Gelu", [f32(2)], {"approximate": "cubic"}, opset=20))
    net = ot.to_torch(model)
    with pytest.raises(UsageError, match=r"node 'node' \(Gelu\): approximate='cubic'"):
        net(torch.from_numpy(feeds["in0"]))


def test_model_local_functions_are_inlined_and_written_back_as_they_were() -> None:
    body = [helper.make_node("Mul", ["a", "w"], ["t"]), helper.make_node("Tanh", ["t"], ["b"])]
    function = helper.make_function("local", "ScaledTanh", ["a", "w"], ["b"], body,
                                    [helper.make_opsetid("", 17)])
    node = helper.make_node("ScaledTanh", ["x", "weight"], ["y"], name="call", domain="local")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(f32(3), "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function])
    net = ot.to_torch(model)
    x = f32(2, 3)
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), _ort(model, {"x": x})[0], rtol=1e-6)
    net.parameter("weight").data.mul_(2)
    back = ot.to_onnx(net)
    assert back.functions == model.functions and back.graph.node == model.graph.node
    np.testing.assert_allclose(_ort(back, {"x": x})[0], np.tanh(x * 2 * numpy_helper.to_array(
        model.graph.initializer[0])), rtol=1e-6)
