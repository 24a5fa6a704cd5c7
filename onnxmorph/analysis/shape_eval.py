"""Shapes computed at run time, evaluated where the sizes they read are known: what ONNX shape inference leaves out.

ONNX shape inference stops at a Slice, Reshape or Expand whose bounds or target are computed from `Shape` with
arithmetic it does not propagate (a division: GPT-NeoX slices its fused [H, 3d] heads at `size // 3`; Falcon's
target is `48 // 8` heads). `values` evaluates such a small integer tensor entry by entry, each entry an int or
None (unknown: a dynamic sequence length), from constants and the sizes `shapes` knows; `propagate` carries
shapes forward through a list of nodes with those values, filling in what inference left unknown. Unlike
`onnxmorph.analysis.sizes`, which reasons symbolically about sizes that stay unknown, this only computes numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

Shape = tuple["int | None", ...]
Shapes = Mapping[str, "Shape | None"]
Entries = list["int | None"]

_MAX_ENTRIES = 64  # a shape tensor, not data
_SAME = ("Cast", "Identity", "Dropout", "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Neg", "Sqrt", "Exp", "Softmax",
         "LogSoftmax", "Abs", "Reciprocal", "Sin", "Cos", "Softplus", "IsNaN", "Not", "LayerNormalization",
         "SimplifiedLayerNormalization", "RMSNormalization", "Clip", "HardSwish", "LeakyRelu", "Elu", "Mish", "Trilu",
         "CumSum", "IsInf", "Floor", "Ceil", "Round", "Sign", "Log")
_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
           "ReduceL1", "ReduceLogSumExp", "ArgMax", "ArgMin")
_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Max", "Min", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "Mod")


def _ints(array: np.ndarray) -> Entries | None:
    flat = np.asarray(array).reshape(-1)
    if flat.size > _MAX_ENTRIES or flat.dtype.kind not in "iub":
        return None
    return [int(v) for v in flat]


class Evaluator:
    """Evaluates small integer tensors (shape arithmetic) with the sizes of `shapes`; memoised per tensor."""

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes
        self.memo: dict[str, Entries | None] = {}

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.values.shape)
        shape = self.shapes.get(tensor.name)
        if shape is None and tensor.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in tensor.shape)
        return shape

    def values(self, tensor: gs.Tensor) -> Entries | None:
        """The entries of a 0-d or 1-d integer tensor (None where unknown), or None when not evaluable."""
        if tensor.name in self.memo:
            return self.memo[tensor.name]
        self.memo[tensor.name] = None  # stops a runaway recursion
        found = self._values(tensor)
        self.memo[tensor.name] = found
        return found

    def _values(self, tensor: gs.Tensor) -> Entries | None:
        if isinstance(tensor, gs.Constant):
            return _ints(tensor.values) if tensor.values.ndim <= 1 else None
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or tensor is not node.outputs[0]:
            return None
        op = node.op
        if op == "Constant":
            value = node.attrs.get("value")
            return _ints(value.values) if isinstance(value, gs.Constant) else None
        if op == "Shape":
            shape = self.shape(node.inputs[0])
            if shape is None:
                return None
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            return list(shape)[slice(start, None if end is None else int(end))]
        if op == "Size":
            shape = self.shape(node.inputs[0])
            return [int(np.prod(shape))] if shape is not None and None not in shape else [None]
        inputs = [self.values(t) if t.name else None for t in node.inputs]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            return inputs[0]
        if op == "Concat":
            return None if any(p is None for p in inputs) else [e for p in inputs for e in p]  # type: ignore[union-attr]
        if op == "Gather":
            index = inputs[1] if len(inputs) > 1 else None
            if inputs[0] is None or index is None or None in index:
                return None
            n = len(inputs[0])
            return [inputs[0][i] for i in index] if all(-n <= i < n for i in index) else None  # type: ignore[index]
        if op == "Slice":
            if inputs[0] is None or any(p is None or None in p for p in inputs[1:3]):
                return None
            step = inputs[4][0] if len(inputs) > 4 and inputs[4] else 1
            return inputs[0][slice(inputs[1][0], inputs[2][0], step)]  # type: ignore[index]
        if op == "ConstantOfShape":
            count, value = inputs[0], node.attrs.get("value")
            fill = _ints(value.values) if isinstance(value, gs.Constant) else [0]
            if count is None or len(count) != 1 or count[0] is None or not fill or count[0] > _MAX_ENTRIES:
                return None
            return [fill[0]] * count[0]
        if op in ("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Equal"):
            return _elementwise(op, inputs[0], inputs[1] if len(inputs) > 1 else None)
        if op == "Where" and all(p is not None for p in inputs[:3]):
            width = max(len(p) for p in inputs)  # type: ignore[arg-type]
            out: Entries = []
            for i in range(width):
                c, x, y = (p[i if len(p) > 1 else 0] for p in inputs)  # type: ignore[index]
                out.append(None if c is None else x if c else y)
            return out
        if op == "Neg" and inputs[0] is not None:
            return [None if v is None else -v for v in inputs[0]]
        return None


def _elementwise(op: str, x: Entries | None, y: Entries | None) -> Entries | None:
    if x is None or y is None or len(x) not in (1, len(y)) and len(y) != 1:
        return None
    width = max(len(x), len(y))
    out: Entries = []
    for i in range(width):
        a, b = x[i if len(x) > 1 else 0], y[i if len(y) > 1 else 0]
        if a is None or b is None:
            out.append(None)
        elif op == "Div" or op == "Mod":
            if b == 0:
                return None
            quotient = abs(a) // abs(b) * (1 if (a >= 0) == (b > 0) else -1)  # ONNX integer Div truncates
            out.append(quotient if op == "Div" else a - b * (a // b))
        else:
            out.append({"Add": a + b, "Sub": a - b, "Mul": a * b, "Max": max(a, b), "Min": min(a, b),
                        "Equal": int(a == b)}[op])
    return out


def _broadcast(shapes: list[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    out: list[int | None] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        known = [d for d in dims if d is not None and d != 1]
        out.append(known[0] if known else (1 if all(d == 1 for d in dims) else None))
    return tuple(out)


def _reshape(source: Shape | None, target: Entries, allowzero: bool) -> Shape:
    out = [(source[i] if source is not None and i < len(source) else None) if v == 0 and not allowzero else v
           for i, v in enumerate(target)]
    if -1 in out:
        known = [d for d in out if d is not None and d != -1]
        total = int(np.prod(source)) if source is not None and None not in source else None
        rest = int(np.prod(known)) if known else 1
        fill = total // rest if total is not None and None not in out and rest and total % rest == 0 else None
        out = [fill if d == -1 else d for d in out]
    return tuple(out)


def _merge(inferred: Shape | None, found: Shape | None) -> Shape | None:
    if found is None:
        return inferred
    if inferred is None or len(inferred) != len(found):
        return found
    return tuple(a if a is not None else b for a, b in zip(inferred, found))


def propagate(nodes: Iterable[gs.Node], shapes: Shapes) -> dict[str, Shape | None]:
    """`shapes` completed along `nodes` (in graph order): each node's outputs get what its inputs' shapes and
    evaluated shape arguments say, where inference did not know."""
    known: dict[str, Shape | None] = dict(shapes)
    evaluator = Evaluator(known)
    for node in nodes:
        found = _output_shape(node, evaluator)
        if found is None or not node.outputs:
            continue
        if isinstance(found, list):
            for out, shape in zip(node.outputs, found):
                known[out.name] = _merge(evaluator.shape(out), shape)
        else:
            known[node.outputs[0].name] = _merge(evaluator.shape(node.outputs[0]), found)
        evaluator.memo.clear()  # sizes read with Shape may now be known
    return known


def _output_shape(node: gs.Node, ev: Evaluator) -> Shape | list[Shape | None] | None:
    shape_of: Callable[[gs.Tensor], Shape | None] = ev.shape
    data = shape_of(node.inputs[0]) if node.inputs and node.inputs[0].name else None
    op = node.op
    if op in _SAME:
        return data
    if op in _BROADCAST:
        operands = [shape_of(t) for t in node.inputs if t.name]
        return _broadcast(operands) if operands and all(s is not None for s in operands) else None  # type: ignore
    if op == "Transpose":
        if data is None:
            return None
        perm = [int(p) for p in node.attrs.get("perm", range(len(data) - 1, -1, -1))]
        return tuple(data[p] for p in perm)
    if op == "Reshape":
        target = ev.values(node.inputs[1])
        return _reshape(data, target, bool(int(node.attrs.get("allowzero", 0)))) if target is not None else None
    if op in ("Unsqueeze", "Squeeze"):
        axes = ev.values(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else (
            [int(a) for a in node.attrs["axes"]] if "axes" in node.attrs else None)
        if data is None or axes is None or None in axes:
            return None
        if op == "Squeeze":
            drop = {a % len(data) for a in axes}  # type: ignore[operator]
            return tuple(d for i, d in enumerate(data) if i not in drop)
        rank = len(data) + len(axes)
        put = {a % rank for a in axes}  # type: ignore[operator]
        rest = iter(data)
        return tuple(1 if i in put else next(rest) for i in range(rank))
    if op == "Expand":
        target = ev.values(node.inputs[1])
        if data is None or target is None:
            return None
        return _broadcast([data, tuple(None if v is None else v for v in target)])
    if op == "Slice":
        return _slice(node, data, ev)
    if op == "Split":
        return _split(node, data, ev)
    if op == "Concat":
        parts = [shape_of(t) for t in node.inputs]
        if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:  # type: ignore[arg-type]
            return None
        axis = int(node.attrs.get("axis", 0)) % len(parts[0])  # type: ignore[arg-type]
        sizes = [p[axis] for p in parts]  # type: ignore[index]
        out = list(_broadcast([tuple(d for i, d in enumerate(p) if i != axis) for p in parts]))  # type: ignore
        out.insert(axis, None if None in sizes else sum(sizes))  # type: ignore[arg-type]
        return tuple(out)
    if op == "Range":
        start, limit, delta = (ev.values(t) for t in node.inputs[:3])
        if not (start and limit and delta) or None in (start[0], limit[0], delta[0]) or not delta[0]:
            return (None,)
        return (max(0, -(-(limit[0] - start[0]) // delta[0])),)  # type: ignore[operator]
    if op == "Shape":
        return (len(data),) if data is not None else None
    if op == "ConstantOfShape":
        target = ev.values(node.inputs[0])
        return tuple(target) if target is not None else None
    if op == "Gather":
        index = shape_of(node.inputs[1])
        if data is None or index is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % len(data)
        return (*data[:axis], *index, *data[axis + 1:])
    if op == "Flatten":
        if data is None:
            return None
        axis = int(node.attrs.get("axis", 1)) % (len(data) + 1)
        head, tail = data[:axis], data[axis:]
        return (int(np.prod(head)) if None not in head else None, int(np.prod(tail)) if None not in tail else None)
    if op in _REDUCE:
        return _reduce(node, data, ev)
    if op == "MatMul":
        a, b = data, shape_of(node.inputs[1])
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        return (*_broadcast([a[:-2], b[:-2]]), a[-2], b[-1]) if len(a) > 2 or len(b) > 2 else (a[-2], b[-1])
    return None


def _reduce(node: gs.Node, data: Shape | None, ev: Evaluator) -> Shape | None:
    if data is None:
        return None
    if node.op in ("ArgMax", "ArgMin"):
        axes: Entries | None = [int(node.attrs.get("axis", 0))]
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = ev.values(node.inputs[1])
    else:
        axes = [int(a) for a in node.attrs["axes"]] if "axes" in node.attrs else []
    if axes is None or None in axes:
        return None
    keep = bool(int(node.attrs.get("keepdims", 1)))
    chosen = {a % len(data) for a in axes} if axes else (  # type: ignore[operator]
        set() if int(node.attrs.get("noop_with_empty_axes", 0)) else set(range(len(data))))
    return tuple(1 if i in chosen else d for i, d in enumerate(data) if keep or i not in chosen)


def _slice(node: gs.Node, data: Shape | None, ev: Evaluator) -> Shape | None:
    if data is None:
        return None
    starts, ends = ev.values(node.inputs[1]), ev.values(node.inputs[2])
    axes = ev.values(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else list(range(len(starts or [])))
    steps = ev.values(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else [1] * len(axes or [])
    if starts is None or ends is None or axes is None or steps is None or None in axes:
        return None
    out = list(data)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = data[axis]  # type: ignore[index]
        if start is None or end is None or step is None or size is None:
            out[axis] = None  # type: ignore[index]
            continue
        out[axis] = len(range(size)[slice(start, end, step)])  # type: ignore[index]
    return tuple(out)


def _split(node: gs.Node, data: Shape | None, ev: Evaluator) -> list[Shape | None] | None:
    if data is None:
        return None
    axis = int(node.attrs.get("axis", 0)) % len(data)
    sizes = ev.values(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else (
        [int(s) for s in node.attrs["split"]] if "split" in node.attrs else None)
    if sizes is None and data[axis] is not None:
        count = len(node.outputs)
        each = -(-data[axis] // count)
        sizes = [min(each, data[axis] - k * each) for k in range(count)]
    if sizes is None:
        return None
    return [tuple(s if i == axis else d for i, d in enumerate(data)) for s in sizes]
