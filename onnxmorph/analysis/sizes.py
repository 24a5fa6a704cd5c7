"""Sizes read at run time and sizes equal by construction: what onnxmorph.analysis.channel_shapes reasons with.

`entries` reads a 0-d/1-d integer tensor (a reshape target, a size) entry by entry: constants, sizes read with
`Shape` ((tensor, axis) pairs), and such sizes times a constant (`Scaled`). `dim_root` says which size a tensor's
axis has by construction, so that sizes shape inference leaves unknown can be compared; `refine_reshape` uses both
to fill in the shapes around a reshape with generic numbers; `fallback_shape` gives Expand and broadcast outputs
the shapes inference missed; `generic_shapes` infers shapes with generic dynamic input sizes. The facts depend on
the graph and its shapes only, so they live in `Analysis.facts` (shared by the analyses of one model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import shape_eval
from onnxmorph.analysis.coupling import constant_ints, ints

if TYPE_CHECKING:  # the traversal imports this module
    from onnxmorph.analysis.channels import Analysis
from onnxmorph.graph import core as mgraph
from onnxmorph.io.loading import skeleton


@dataclass(frozen=True)
class Scaled:
    """An entry that is a size read with Shape times a constant (grouped-query attention's kv_heads * n_rep)."""

    name: str
    axis: int
    factor: int


def size_of(entry: object) -> tuple[str, int, int] | None:
    """(tensor, axis, factor) of an entry that is a size read with Shape (factor 1) or a multiple of one."""
    if isinstance(entry, tuple):
        return entry[0], entry[1], 1
    return (entry.name, entry.axis, entry.factor) if isinstance(entry, Scaled) else None


@dataclass(frozen=True)
class Expr:
    """A size read with Shape, then shifted by constants and floor-divided by positive constants (a sequence length
    after strided convolutions), in a normal form (`step`) so that one formula written two ways compares equal."""

    name: str
    axis: int
    ops: tuple[tuple[str, int], ...]


def step(ops: tuple[tuple[str, int], ...], op: str, k: int) -> tuple[tuple[str, int], ...]:
    """`ops` then `op` ("add" k, or "fdiv" by k > 0), normalised: floor((x + c*k) / k) = floor(x / k) + c and
    floor(floor(x / a) / b) = floor(x / (a*b)) for every integer x."""
    last = ops[-1] if ops else None
    if op == "add":
        if last is not None and last[0] == "add":
            ops, k = ops[:-1], k + last[1]
        return ops + ((("add", k),) if k else ())
    if k == 1:
        return ops
    if last is not None and last[0] == "add" and last[1] % k == 0:
        return step(step(ops[:-1], "fdiv", k), "add", last[1] // k)
    if last is not None and last[0] == "fdiv":
        return ops[:-1] + (("fdiv", last[1] * k),)
    return ops + (("fdiv", k),)


INT64_MAX = 2 ** 63 - 1
PASS = ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten")  # 0-d/1-d shape tensors: entries unchanged
PICK = ("Gather", "Slice", "Concat")


def entries(a: Analysis, tensor: gs.Tensor) -> list | None:
    """The entries of a 0-d or 1-d integer tensor: ints and (tensor, axis) sizes read with Shape; None if unknown."""
    key = ("entries", tensor.name)
    if key not in a.facts:
        a.facts[key] = None  # a cycle cannot occur in a valid graph; this also stops runaway recursion
        a.facts[key] = _entries(a, tensor)
    return a.facts[key]  # type: ignore[return-value]


def _entries(a: Analysis, tensor: gs.Tensor) -> list | None:
    if isinstance(tensor, gs.Constant):
        return ints(tensor.values) if len(tensor.shape) <= 1 else None
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or tensor is not node.outputs[0]:
        return None
    if node.op == "Constant" and "value" in node.attrs:
        return _entries(a, node.attrs["value"]) if isinstance(node.attrs["value"], gs.Constant) else None
    if node.op == "Shape":
        known = entries(a, node.inputs[0]) if a.rank(node.inputs[0]) == 1 else None
        if known is not None:  # the length of a shape tensor
            return [len(known)][slice(int(node.attrs.get("start", 0)), node.attrs.get("end"))]
        rank = a.rank(node.inputs[0])
        if rank is None:
            return None
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
        return [(node.inputs[0].name, i) for i in range(rank)][slice(start, end)]
    if node.op in ("ConstantOfShape", "Where", "Mul", "Add", "Sub", "Div"):
        return _computed_entries(a, node)
    source = entries(a, node.inputs[0]) if node.inputs else None
    if source is None:
        return None
    if node.op in PASS:
        return source if (a.rank(tensor) or 0) <= 1 and (a.rank(node.inputs[0]) or 0) <= 1 else None
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [entries(a, t) for t in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) in (0, -1):
        index = constant_ints(node, 1)
        return [source[i] for i in index] if index is not None and all(-len(source) <= i < len(source)
                                                                         for i in index) else None
    if node.op == "Slice":
        starts, ends = constant_ints(node, 1, "starts"), constant_ints(node, 2, "ends")
        axes, steps = constant_ints(node, 3, "axes") or [0], constant_ints(node, 4) or [1]
        if starts is None or ends is None or len(starts) != 1 or axes[0] not in (0, -1):
            return None
        return source[slice(starts[0], min(ends[0], INT64_MAX), steps[0])]
    return None


def _computed_entries(a: Analysis, node: gs.Node) -> list | None:
    """Arithmetic on constant entries, and `Where(Equal(t, c), u, t)` (how TorchScript turns -1 entries of an
    expand target into 1): a size read with Shape is never negative, so it never equals a negative constant."""
    if node.op == "ConstantOfShape":
        count = entries(a, node.inputs[0])
        value = node.attrs.get("value")
        fill = ints(value.values)[0] if isinstance(value, gs.Constant) and value.values.dtype.kind in "iu" else None
        known = count is not None and len(count) == 1 and isinstance(count[0], int)
        return [fill] * count[0] if known and fill is not None else None  # type: ignore[index]
    parts = [entries(a, t) for t in node.inputs]
    if any(p is None for p in parts):
        if node.op != "Where" or parts[1] is None or parts[2] is None:
            return None
        cond = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if cond is None or cond.op != "Equal" or cond.inputs[0] is not node.inputs[2]:
            return None
        against = entries(a, cond.inputs[1])
        if against is None or len(against) != len(parts[2]) or len(parts[1]) != len(parts[2]):
            return None
        chosen = []
        for t, c, u in zip(parts[2], against, parts[1]):
            if t != c and not (isinstance(c, int) and (isinstance(t, int) or c < 0)):
                return None
            chosen.append(u if t == c else t)
        return chosen
    width = max(len(p) for p in parts)  # type: ignore[arg-type]
    if node.op == "Where" or len(parts) != 2 or any(len(p) not in (1, width) for p in parts):  # type: ignore[arg-type]
        return None
    out = []
    for i in range(width):
        x, y = (p[i if len(p) > 1 else 0] for p in parts)  # type: ignore[index]
        if isinstance(x, int) and isinstance(y, int):
            if node.op == "Div" and (y <= 0 or x < 0):
                return None
            out.append({"Mul": x * y, "Add": x + y, "Sub": x - y, "Div": x // max(y, 1)}[node.op])
            continue
        entry = _arithmetic(node.op, x, y)
        if entry is None:
            return None
        out.append(entry)
    return out


def _arithmetic(op: str, x: object, y: object) -> object | None:
    """A size times, plus, minus or (floor) over a constant: `Scaled` or `Expr`; None for anything else."""
    size, k = (x, y) if isinstance(y, int) else (y, x)
    if not isinstance(k, int):
        return None
    if op == "Mul":
        found = size_of(size)
        return Scaled(found[0], found[1], found[2] * k) if found is not None and k >= 1 else None
    if op == "Sub" and size is not x or op == "Div" and (size is not x or k <= 0):
        return None  # a constant minus a size, or over one: not a form kept here
    base = size if isinstance(size, Expr) else Expr(size[0], size[1], ()) if isinstance(size, tuple) else None
    if base is None:
        return None
    ops = step(base.ops, "fdiv" if op == "Div" else "add", k if op != "Sub" else -k)
    return Expr(base.name, base.axis, ops) if ops else (base.name, base.axis)


# ---------------------------------------------------------------------------- sizes equal by construction

# ops whose output has their first input's shape (a unary op, a norm over the last axes)
SAME_SHAPE = ("Cast", "Identity", "Dropout", "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Neg", "Sqrt", "Exp", "Softmax",
              "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "LogSoftmax", "Abs", "IsNaN",
              "Not", "Reciprocal", "Sin", "Cos")
BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Max", "Min", "Equal", "Less", "Greater",
             "LessOrEqual", "GreaterOrEqual")
ONE = ("=1", -1)  # a size 1 by construction (an axis Unsqueeze inserts)
# distinct primes standing for sizes that are unknown but equal on both sides of a reshape (TIES), and for the
# dynamic sizes of the inputs (INPUT_SIZES): a mapping found with them holds whatever the sizes are, as no
# product of the other sizes can equal one of them
TIES = (100003, 100019, 100043, 100049, 100057, 100069, 100103, 100109)
INPUT_SIZES = (100129, 100151, 100153, 100169, 100183, 100189)


def dim_root(a: Analysis, tensor: gs.Tensor, axis: int) -> tuple[str, int]:
    """The (tensor, axis) whose size `tensor`'s `axis` has by construction (through same-shape ops, splits and
    slices of other axes, transposes, products' batch axes, reshapes that copy a size), to compare sizes that
    shape inference leaves unknown."""
    prepare(a)
    rank = a.rank(tensor)
    key = ("root", tensor.name, axis % rank if rank else axis)
    if key not in a.facts:
        a.facts[key] = (tensor.name, axis)
        a.facts[key] = _dim_root(a, tensor, axis)
    return a.facts[key]  # type: ignore[return-value]


def prepare(a: Analysis) -> None:
    """Every tensor's fallback shape and size roots, in graph order: each then takes one step to the memoised
    answer of its inputs, so a deep model's long stream costs no deep recursion."""
    if a.facts.get("prepared"):
        return
    a.facts["prepared"] = True
    for node in a.graph.nodes:  # topologically sorted, as ONNX requires
        for out in node.outputs:
            for axis in range(len(a.shape(out) or ())):
                dim_root(a, out, axis)


def _dim_root(a: Analysis, tensor: gs.Tensor, axis: int) -> tuple[str, int]:
    node = tensor.inputs[0] if tensor.inputs else None
    rank = a.rank(tensor) or (axis + 1 if axis >= 0 and node is not None and node.op == "Range" else None)
    if node is not None and rank is not None and node.inputs:
        up = _dim_source(a, node, tensor, axis % rank, rank)
        if up is not None:
            # a root found already (a broadcast's operands), or the input's, one step up
            return up if isinstance(up[0], str) else dim_root(a, up[0], up[1])  # type: ignore[return-value]
    named = tensor.shape[axis] if not tensor.inputs and tensor.shape and 0 <= axis < len(tensor.shape) else None
    if axis == 0 and tensor.name in a.inputs and not isinstance(named, int):
        return "=batch", -1  # the inputs' dynamic axis 0 is the batch, one size (as graph.infer_shapes takes it)
    if isinstance(named, str) and named:
        return f"={named}", -1  # graph inputs' sizes with one name (sequence) are the same size
    return tensor.name, axis % rank if rank else axis


def _dim_source(a: Analysis, node: gs.Node, tensor: gs.Tensor, axis: int,
                rank: int) -> tuple[gs.Tensor | str, int] | None:
    first = node.inputs[0]
    same_rank = a.rank(first) == rank
    if node.op in SAME_SHAPE and same_rank or node.op == "Concat" and int(node.attrs.get("axis", 0)) % rank != axis:
        return first, axis
    if node.op in ("Split", "Slice") and same_rank:
        cut = constant_ints(node, 3, "axes") if node.op == "Slice" else [int(node.attrs.get("axis", 0))]
        if cut is not None and axis not in [c % rank for c in cut]:
            return first, axis
        return _slice_dim(a, node, axis, rank, cut) if node.op == "Slice" and cut is not None else None
    if node.op == "Transpose" and "perm" in node.attrs:
        return first, int(node.attrs["perm"][axis])
    if node.op == "Gemm" and axis == 0 and not int(node.attrs.get("transA", 0)):
        return first, 0
    if node.op == "MatMul" and rank >= 2:
        return _matmul_dim(a, node, axis, rank)
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and isinstance(first, gs.Constant):
        indices = a.rank(node.inputs[1]) or 0
        return (node.inputs[1], axis) if axis < indices else None  # an embedding: [ids..., C]
    if node.op == "Reshape":
        values = entries(a, node.inputs[1])
        entry = values[axis] if values is not None and axis < len(values) else None
        if isinstance(entry, tuple):
            return a.tensors[entry[0]], entry[1]
        if isinstance(entry, Expr):
            return expr_root(a, entry)  # type: ignore[return-value]
        if entry == 0 and not int(node.attrs.get("allowzero", 0)) and same_rank:
            return first, axis
        return None
    if node.op in BROADCAST:
        return _common_root(a, list(node.inputs), axis, rank)
    return _dim_source_more(a, node, axis, rank)


def _dim_source_more(a: Analysis, node: gs.Node, axis: int, rank: int) -> tuple[gs.Tensor | str, int] | None:
    """The ops that build index tensors and masks: Unsqueeze, Squeeze, Expand, Range, GatherND."""
    first = node.inputs[0]
    if node.op in ("Unsqueeze", "Squeeze"):
        axes = constant_ints(node, 1, "axes")
        unsqueeze = node.op == "Unsqueeze"
        if axes is None:
            return None
        axes = sorted(x % (rank if unsqueeze else (a.rank(first) or 0) or 1) for x in axes)
        if unsqueeze:
            return ONE if axis in axes else (first, axis - sum(x < axis for x in axes))
        j = axis
        for x in axes:
            j += x <= j
        return first, j
    if node.op == "Expand":
        target = entries(a, node.inputs[1])
        j = axis - rank + (a.rank(first) or 0)
        if target is None or axis - rank + len(target) < 0:
            return (first, j) if j >= 0 else None
        entry = target[axis - rank + len(target)]
        roots = {dim_root(a, first, j)} if j >= 0 else set()
        roots.add(_entry_root(a, entry))
        roots = {r for r in roots if not _is_one(a, r)} or roots
        return roots.pop() if len(roots) == 1 else None
    if node.op == "Range":
        start, limit, delta = (entries(a, t) for t in node.inputs[:3])
        if start == [0] and delta == [1] and limit is not None and isinstance(limit[0], (tuple, Expr)):
            return _entry_root(a, limit[0])
        return None
    if node.op.startswith("Reduce") and int(node.attrs.get("keepdims", 1)) and (a.rank(first) or 0) == rank:
        axes = constant_ints(node, 1, None if len(node.inputs) > 1 else "axes")
        if axes is None and not int(node.attrs.get("noop_with_empty_axes", 0)):
            axes = list(range(rank))
        return None if axes is None else ONE if axis in [x % rank for x in axes] else (first, axis)
    if node.op in ("Conv", "MaxPool", "AveragePool"):
        return _window_dim(a, node, axis)
    if node.op == "GatherND" and not int(node.attrs.get("batch_dims", 0)):
        return (node.inputs[1], axis) if axis < (a.rank(node.inputs[1]) or 0) - 1 else None
    return None


def _entry_root(a: Analysis, entry: object) -> tuple:
    """The size root of a target entry: a size read with Shape, a formula of one, or a constant."""
    if isinstance(entry, tuple):
        return dim_root(a, a.tensors[entry[0]], entry[1])
    if isinstance(entry, Expr):
        return expr_root(a, entry)
    return ONE if entry in (1, -1) else (f"={entry}", -1)


def expr_root(a: Analysis, entry: Expr) -> tuple:
    """The root of a formula of a size: the formula over the root of the size it starts from."""
    return compose(dim_root(a, a.tensors[entry.name], entry.axis), entry.ops)


def compose(root: tuple, ops: tuple[tuple[str, int], ...]) -> tuple:
    """`ops` applied to a size root (itself a formula or not), in normal form."""
    base, done = (root[1], root[2]) if root[0] == "=expr" else (root, ())
    for op, k in ops:
        done = step(done, op, k)
    return ("=expr", base, done) if done else base


def _window_dim(a: Analysis, node: gs.Node, axis: int) -> tuple | None:
    """A conv's or pool's output size: its batch axis's, or on a spatial axis floor((L + pads - d*(k-1) - 1)/s) + 1
    over the input's L (explicit pads, no ceil mode)."""
    first = node.inputs[0]
    if axis == 0:
        return first, 0
    if axis < 2:
        return None
    i = axis - 2
    kernel = constant_ints(node, 99, "kernel_shape")
    if kernel is None and node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
        kernel = [int(d) for d in node.inputs[1].shape[2:]]
    auto = node.attrs.get("auto_pad", "NOTSET")
    if kernel is None or i >= len(kernel) or (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET" \
            or int(node.attrs.get("ceil_mode", 0)):
        return None
    pads = constant_ints(node, 99, "pads") or [0] * 2 * len(kernel)
    stride = (constant_ints(node, 99, "strides") or [1] * len(kernel))[i]
    dilation = (constant_ints(node, 99, "dilations") or [1] * len(kernel))[i]
    shift = pads[i] + pads[i + len(kernel)] - dilation * (kernel[i] - 1) - 1
    return compose(dim_root(a, first, axis), (("add", shift), ("fdiv", stride), ("add", 1)))


def _slice_dim(a: Analysis, node: gs.Node, axis: int, rank: int, cut: list[int]) -> tuple | None:
    """A slice of the axis from a fixed start to the end or to a fixed distance from it: the size less those."""
    i = [c % rank for c in cut].index(axis)
    starts, ends = constant_ints(node, 1), constant_ints(node, 2)
    steps = constant_ints(node, 4) or [1] * len(cut)
    if starts is None or ends is None or steps[i] != 1 or starts[i] < 0 or 0 <= ends[i] < INT64_MAX // 2:
        return None  # a fixed end keeps min(end, L) - start: not a formula of L kept here
    shift = -starts[i] + (ends[i] if ends[i] < 0 else 0)
    return compose(dim_root(a, node.inputs[0], axis), (("add", shift),))


def _common_root(a: Analysis, operands: list[gs.Tensor], axis: int, rank: int) -> tuple[str, int] | None:
    """A broadcast's size on `axis`: the operands' common one, when every operand that is not 1 there by
    construction has it (operands without the axis broadcast)."""
    roots = set()
    for t in operands:
        shape = a.shape(t) if t.name else ()
        if shape is None:
            return None
        j = axis - rank + len(shape)
        if j < 0:
            continue
        if isinstance(t, gs.Constant):
            roots.add(ONE if shape[j] == 1 else (f"={shape[j]}", -1))
        else:
            roots.add(dim_root(a, t, j))
    roots = {r for r in roots if not _is_one(a, r)} or roots  # a size 1 by construction broadcasts
    return roots.pop() if len(roots) == 1 else None


def _matmul_dim(a: Analysis, node: gs.Node, axis: int, rank: int) -> tuple[gs.Tensor | str, int] | None:
    """A product's rows come from its first operand, its columns from its second, its batch axes from both."""
    left, right = node.inputs[0], node.inputs[1]
    if axis == rank - 1:
        return right, -1
    if axis == rank - 2:
        return (left, -2) if (a.rank(left) or 0) >= 2 else None
    return _common_root(a, [left, right], axis, rank)


def refine_reshape(a: Analysis, node: gs.Node, src: tuple, dst: tuple, backward: bool) -> tuple[tuple, tuple]:
    """The shapes around a Reshape with what its computed target says: leading sizes it copies from its input
    (unknown, but equal) become the same generic number on both sides, and one unknown size left (a -1) follows
    from the element count. (src, dst) as the traversal sees them; unchanged when nothing is learnt."""
    if node.op != "Reshape" or None not in src + dst or len(node.inputs) < 2:
        return src, dst
    values = entries(a, node.inputs[1])
    ins, outs = (list(dst), list(src)) if backward else (list(src), list(dst))
    if values is None or len(values) != len(outs):
        return src, dst
    roots = [dim_root(a, node.inputs[0], j) for j in range(len(ins))]
    ties = iter(TIES)
    for p, entry in enumerate(values):
        j = p if entry == 0 and not int(node.attrs.get("allowzero", 0)) and p < len(ins) else None
        if isinstance(entry, (tuple, Expr)):
            root = dim_root(a, a.tensors[entry[0]], entry[1]) if isinstance(entry, tuple) else expr_root(a, entry)
            j = roots.index(root) if roots.count(root) == 1 else None
        if j is None or ins[j] is not None and outs[p] is not None:
            continue
        known = ins[j] if ins[j] is not None else outs[p]
        ins[j] = outs[p] = known if known is not None else next(ties, None)
    _one_unknown(ins, outs)
    return (tuple(outs), tuple(ins)) if backward else (tuple(ins), tuple(outs))


class Shapes(dict):
    """Inferred shapes, and the facts about sizes read at run time found on the graph they were inferred for
    (entries, size roots, fallback shapes: the same for every analysis of that graph, so computed once)."""

    def facts_for(self, graph: gs.Graph) -> dict:
        found = getattr(self, "_facts", None)
        if found is None or found[0] is not graph:
            found = self._facts = (graph, {})
        return found[1]


def generic_shapes(model: onnx.ModelProto, known: dict[str, tuple[int | None, ...] | None] | None = None) -> Shapes:
    """Inferred shapes with every dynamic input size but the batch (taken as 1, as `graph.infer_shapes` does) set
    to a generic number, one per size name: the sizes that shape inference leaves unknown after a reshape whose
    target is computed from `Shape` (sequence lengths, head counts) become known, and a channel mapping found with
    them holds whatever the sizes are (INPUT_SIZES). Where `known` (the plain inference) knows more (a graph whose
    inference fails at the generic sizes), it is kept."""
    probe = skeleton(model)
    names: dict[str, int] = {}
    for info in probe.graph.input:
        for k, dim in enumerate(info.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") or k == 0:
                continue
            key = dim.dim_param or f"{info.name}:{k}"
            if key not in names and len(names) < len(INPUT_SIZES):
                names[key] = INPUT_SIZES[len(names)]
            if key in names:
                dim.dim_value = names[key]
    if not names and known is not None:
        return Shapes(known)  # no dynamic size but the batch: the plain inference is the generic one
    found = Shapes(mgraph.infer_shapes(probe))
    for name, shape in (known or {}).items():
        mine = found.get(name)
        if shape is None:
            continue
        if mine is None or len(mine) != len(shape) or any(d is not None and m is not None and d != m
                                                          for d, m in zip(shape, mine)):
            found[name] = shape  # the plain inference knows this one, or says otherwise: it wins
        else:
            found[name] = tuple(d if d is not None else m for d, m in zip(shape, mine))
    return found


def analysis_shapes(analysis: mgraph.Analysis) -> Shapes:
    """`generic_shapes` of the analysed model completed along its graph where shape arithmetic that inference does
    not propagate (a division, a Range, a gathered mask) can be evaluated (`shape_eval.propagate`); one per
    Analysis."""
    def compute() -> Shapes:
        generic = generic_shapes(analysis.model, analysis.shapes)
        return Shapes(shape_eval.propagate(analysis.view.nodes, generic))
    return analysis.memo("generic_shapes", None, compute)


def _one_unknown(ins: list, outs: list) -> None:
    """A reshape keeps the element count: one unknown size follows from the others; one unknown on each side (a
    head count that a -1 copies) gets a generic number and its multiple."""
    missing = [[p for p, d in enumerate(shape) if d is None] for shape in (ins, outs)]
    known = [math.prod(d for d in shape if d is not None) for shape in (ins, outs)]
    if not known[0] or not known[1] or sum(map(len, missing)) > 2 or any(len(m) > 1 for m in missing):
        return
    if not missing[0] and missing[1] and not known[0] % known[1]:
        outs[missing[1][0]] = known[0] // known[1]
    elif not missing[1] and missing[0] and not known[1] % known[0]:
        ins[missing[0][0]] = known[1] // known[0]
    elif missing[0] and missing[1]:
        small, large = sorted(known)
        if large % small == 0:
            ratio = large // small
            ins[missing[0][0]] = TIES[-1] * (ratio if known[0] == small else 1)
            outs[missing[1][0]] = TIES[-1] * (ratio if known[1] == small else 1)


def fallback_shape(a: Analysis, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
    """The shape of an Expand (from its target's entries), a broadcast or a cast that inference left unknown: enough
    to see which sizes are 1 (an attention mask broadcast over the heads)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or tensor is not node.outputs[0]:
        return None
    key = ("fallback", tensor.name)
    if key in a.facts:
        return a.facts[key]  # type: ignore[return-value]
    prepare(a)  # the inputs' shapes first, in graph order
    if key in a.facts:
        return a.facts[key]  # type: ignore[return-value]
    a.facts[key] = None
    shapes = [a.shape(t) if t.name else () for t in node.inputs]
    found = None
    if node.op == "Expand" and shapes[0] is not None:
        target = entries(a, node.inputs[1])
        if target is not None:
            sizes = [_entry_size(a, e) for e in target]
            found = _broadcast([shapes[0], tuple(None if s is not None and s < 0 else s for s in sizes)])
    elif node.op in BROADCAST + ("And", "Or", "Equal", "Less", "Greater") and all(s is not None for s in shapes):
        found = _broadcast(shapes)  # type: ignore[arg-type]
    elif node.op in ("Cast", "Not", "Neg", "Identity", "IsNaN") and shapes and shapes[0] is not None:
        found = shapes[0]
    a.facts[key] = found
    return found


def _broadcast(shapes: list[tuple]) -> tuple[int | None, ...]:
    """Numpy broadcasting of shapes with unknown sizes: 1 only where every operand has 1 (or lacks the axis)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        sizes = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        big = sizes - {1, None}
        out.append(big.pop() if len(big) == 1 else (1 if sizes == {1} else None))
    return tuple(out)


def _is_one(a: Analysis, root: tuple[str, int]) -> bool:
    """Whether a size root is a constant's axis of size 1 (a position table's batch axis)."""
    tensor = a.tensors.get(root[0])
    if root == ONE:
        return True
    return isinstance(tensor, gs.Constant) and 0 <= root[1] < len(tensor.shape) and tensor.shape[root[1]] == 1


def _entry_size(a: Analysis, entry: object) -> int | None:
    size = size_of(entry)
    if size is None:
        return entry if isinstance(entry, int) else None
    dims = a.shape(a.tensors[size[0]]) or ()
    return dims[size[1]] * size[2] if -len(dims) <= size[1] < len(dims) and dims[size[1]] is not None else None
