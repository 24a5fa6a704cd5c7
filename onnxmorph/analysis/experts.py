"""Feed-forward sublayers and mixtures of experts found on the graph, whatever exported it (for the moe morph).

An *FFN* is a down projection (a MatMul/Gemm layer with a constant weight) whose input is computed
unit by unit (activations, products, scalar or per-unit constants, reshapes that keep the last
axis, splits of a fused projection) from the outputs of inner layers (up, gate, or one fused
gate-up projection) that all read one tensor, the FFN's *input*. Its *output* is the down
projection's output after the linear ops that follow it (bias Adds, reshapes, scalar Muls). The
FFN's *nodes* are those between the two, copied whole into each expert. `unit_structure` says how
each hidden unit is made (which rows of which projection), what a shard of the FFN needs, and in
which projection a unit is positively homogeneous (the rescaling that keeps an expert exact).

An existing *MoE* is a TopK over the outputs of a router layer (through a Softmax or not) whose
indices pick experts: rows of stacked expert weights (Gather/GatherND of a constant [E, ...]) in
Hugging Face's exports, or the Split of a scattered gate tensor that weights whole FFNs (onnxmorph's
own dense form). Attention never has a TopK over a layer's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.analysis import blocks as mblocks
from onnxmorph.graph.core import Analysis, layer_info, producer

__all__ = ["FFN", "Units", "MoE", "StackedUnits", "ffns", "model_ffns", "unit_structure", "stacked_units", "moes",
           "model_moes", "int_values", "in_features", "out_features", "summary", "unrouted_experts"]

# ops that pass their first input's values on (data input 0; other inputs are shapes or axes)
LINKS = ("Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Dropout")
# unit-wise activations; relu-like ones are positively homogeneous: act(s z) = s act(z) for s > 0
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
ACTIVATIONS = HOMOGENEOUS + ("Gelu", "Sigmoid", "Tanh", "Erf", "Softplus", "Elu", "Selu", "Celu", "HardSigmoid",
                             "HardSwish", "Mish", "Softsign", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Sin",
                             "Cos", "ThresholdedRelu", "Neg")
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow")
_BLIND = ("Shape", "Size")
_MAX_DEPTH = 64


# --------------------------------------------------------------------------- small integer tensors


def int_values(tensor: gs.Tensor, shapes: dict, depth: int = 0) -> list[int | None] | None:
    """The entries of a 0-d/1-d integer tensor computed from constants and static dims read by Shape.

    An entry is None where it depends on a dynamic size; None for the whole when the tensor is not
    such a computation.
    """
    if depth > _MAX_DEPTH:
        return None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        return [int(v) for v in values.reshape(-1)] if values.ndim <= 1 and values.dtype.kind in "iu" else None
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return int_values(value, shapes, depth + 1) if isinstance(value, gs.Constant) else None
    if node.op == "Shape":
        dims = shapes.get(node.inputs[0].name)
        if dims is None:
            return None
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        return list(dims)[slice(start, None if end is None else int(end))]
    parts = [int_values(t, shapes, depth + 1) if t.name else None for t in node.inputs]
    if not parts or parts[0] is None:
        return None
    if node.op in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"):
        return parts[0]
    if node.op == "Concat":
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    if node.op == "Gather" and len(parts) > 1 and parts[1] is not None:
        n = len(parts[0])
        return [parts[0][i] for i in parts[1]] if all(-n <= i < n for i in parts[1] if i is not None) else None
    if node.op == "Slice" and len(parts) >= 3 and parts[1] and parts[2] and len(parts[1]) == 1:
        steps = parts[4] if len(parts) > 4 and parts[4] else [1]
        if None in (parts[1][0], parts[2][0], steps[0]) or steps[0] == 0:
            return None
        return parts[0][slice(parts[1][0], min(parts[2][0], 2 ** 62), steps[0])]
    if node.op in ("Add", "Sub", "Mul", "Div") and len(parts) == 2 and parts[1] is not None:
        a, b = parts
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return None
        width = max(len(a), len(b))
        out: list[int | None] = []
        for i in range(width):
            x, y = a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]
            if x is None or y is None or (node.op == "Div" and y == 0):
                out.append(None)
            else:
                out.append({"Add": x + y, "Sub": x - y, "Mul": x * y, "Div": int(x / y)}[node.op])
        return out
    return None


def _dims(shapes: dict, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    return shapes.get(tensor.name)


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _constant_size(tensor: gs.Tensor) -> int:
    return int(np.prod(tensor.shape)) if _is_constant(tensor) else -1


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs that carry values (not shapes, axes or indices) into `node`."""
    if node.op in LINKS or node.op in ("Split", "Slice", "Expand", "Tile"):
        return node.inputs[:1]
    if node.op in ARITHMETIC or node.op in ACTIVATIONS:
        return [t for t in node.inputs if t.name and not _is_constant(t)]
    return [t for t in node.inputs if t.name and not _is_constant(t)]


# --------------------------------------------------------------------------- FFNs


@dataclass
class FFN:
    """A feed-forward sublayer: input -> inner layers -> unit-wise hidden -> down projection -> output."""

    input: gs.Tensor
    output: gs.Tensor
    down: gs.Node
    inner: list[gs.Node]
    nodes: list[gs.Node]  # every node from the input to the output, in graph order
    hidden: int  # the down projection's input features
    activations: tuple[str, ...]  # the unit-wise ops between inner layers and the down projection
    module: str | None = None
    block: int | None = None

    @property
    def name(self) -> str:
        return self.module or self.down.name

    @property
    def layers(self) -> list[gs.Node]:
        return [*self.inner, self.down]


def _down_input(node: gs.Node) -> gs.Tensor | None:
    """The data input of a layer whose weight is input 1 (x @ W; Gemm with A not transposed)."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    return node.inputs[0] if node.inputs and node.inputs[0].name else None


def in_features(node: gs.Node) -> int:
    """The input features of a 2-d MatMul/Gemm layer (its weight's contracted axis)."""
    shape = node.inputs[1].shape
    if node.op == "Gemm":
        return int(shape[1] if node.attrs.get("transB", 0) else shape[0])
    return int(shape[-2]) if len(shape) >= 2 else int(shape[0])


def out_features(node: gs.Node) -> int:
    """The output features of a MatMul/Gemm layer."""
    shape = node.inputs[1].shape
    if node.op == "Gemm":
        return int(shape[0] if node.attrs.get("transB", 0) else shape[1])
    return int(shape[-1])


def _hidden_path(down: gs.Node) -> tuple[list[gs.Node], list[gs.Node]] | None:
    """(inner layers, unit-wise nodes) that make the down projection's input; None when it is not such a path."""
    start = _down_input(down)
    if start is None:
        return None
    inner: dict[int, gs.Node] = {}
    path: dict[int, gs.Node] = {}
    stack, seen = [start], set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        node = producer(tensor)
        if node is None:
            return None
        info = layer_info(node)
        if info is not None and node.op in ("MatMul", "Gemm"):
            if _down_input(node) is None or len(node.inputs[1].shape) != 2:
                return None
            inner[id(node)] = node
            continue
        ok = node.op in LINKS or node.op in ACTIVATIONS or node.op in ("Split", "Slice")
        ok = ok or (node.op in ARITHMETIC and len(node.inputs) == 2)
        if not ok:
            return None
        path[id(node)] = node
        stack.extend(_data_inputs(node))
    if not inner or not any(_nonlinear(n) for n in path.values()):
        # two projections with only affine ops between them (a factorised layer; ELECTRA's and ALBERT's
        # embedding projection, bias and all, read by the first block's query) are not an FFN
        return None
    return list(inner.values()), list(path.values())


def _nonlinear(node: gs.Node) -> bool:
    """Whether `node` makes its output other than an affine function of its data input: an activation, a product
    or quotient of two computed tensors (a gate), a power other than 1."""
    if node.op in ACTIVATIONS:
        return node.op != "Neg"
    if node.op in ("Mul", "Div"):
        return len(_data_inputs(node)) == 2
    if node.op == "Pow":
        exponent = node.inputs[1] if len(node.inputs) > 1 else None
        return not (_is_constant(exponent) and np.all(np.asarray(exponent.values) == 1))
    return False


def _link_chain(tensor: gs.Tensor) -> list[gs.Tensor]:
    """`tensor` and what it was made from through LINKS (Reshape, Cast, ...), nearest first."""
    chain = [tensor]
    node = producer(tensor)
    while node is not None and node.op in LINKS and node.op != "Cast" and node.inputs and node.inputs[0].name:
        chain.append(node.inputs[0])
        node = producer(node.inputs[0])
    return chain


def _common_input(inner: list[gs.Node], rank: int | None = None, shapes: dict | None = None) -> gs.Tensor | None:
    chains = [_link_chain(n.inputs[0]) for n in inner]
    # the farthest tensor that every inner layer reaches through links: the FFN reads it, whatever the
    # reshapes in front of each projection (GPT-2's Gemms read a 2-d view of the 3-d stream); of those, one
    # of the output's rank when the shapes say (Qwen-MoE's shared expert works on a 2-d view)
    common = [t for t in reversed(chains[0]) if all(any(c is t for c in chain) for chain in chains[1:])]
    if rank is not None and shapes:
        same = [t for t in common if shapes.get(t.name) is not None and len(shapes[t.name]) == rank]
        if same and not any(shapes.get(t.name) is not None and len(shapes[t.name]) == rank for t in common[:1]):
            return same[0]
    return common[0] if common else None


def _linear_end(down: gs.Node) -> gs.Tensor:
    """The down projection's output after the linear ops that follow it alone (bias Adds, reshapes, scalar Muls)."""
    tensor = down.outputs[0]
    for _ in range(_MAX_DEPTH):
        readers = [n for n in tensor.outputs if n.op not in _BLIND]
        if len(readers) != 1:
            return tensor
        node = readers[0]
        if node.op in LINKS and node.op != "Cast" and node.inputs[0] is tensor:
            pass
        elif node.op in ("Add", "Sub") and len(node.inputs) == 2 and node.inputs[0] is tensor \
                and _is_constant(node.inputs[1]):
            pass
        elif node.op in ("Add", "Mul") and len(node.inputs) == 2 and node.inputs[1] is tensor \
                and _is_constant(node.inputs[0]):
            pass
        elif node.op in ("Mul", "Div") and len(node.inputs) == 2 and node.inputs[0] is tensor \
                and _constant_size(node.inputs[1]) == 1:
            pass
        else:
            return tensor
        tensor = node.outputs[0]
    return tensor


def _between(graph: gs.Graph, start: gs.Tensor, end: gs.Tensor) -> list[gs.Node]:
    """Nodes that depend on `start` and that `end` depends on, in graph order."""
    ancestors: set[int] = set()
    stack = [producer(end)]
    while stack:
        node = stack.pop()
        if node is None or id(node) in ancestors:
            continue
        ancestors.add(id(node))
        for tensor in node.inputs:
            if tensor is not start and tensor.name:
                stack.append(producer(tensor))
    depends = {start.name}
    found = []
    for node in graph.nodes:
        if id(node) in ancestors and any(t.name in depends for t in node.inputs):
            found.append(node)
            depends.update(t.name for t in node.outputs)
    return found


def ffns(graph: gs.Graph, modules: dict[str, str] | None = None, blocks: Sequence[mblocks.Block] = (),
         shapes: dict | None = None) -> list[FFN]:
    """Every FFN of `graph`, in the graph order of their down projections (`shapes`: to match in- and output ranks)."""
    found = []
    block_of = {id(n): b.index for b in blocks for n in b.nodes}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or layer_info(node) is None or len(node.inputs[1].shape) != 2:
            continue
        path = _hidden_path(node)
        if path is None:
            continue
        inner, hidden_nodes = path
        end = _linear_end(node)
        out_shape = (shapes or {}).get(end.name)
        start = _common_input(inner, len(out_shape) if out_shape is not None else None, shapes)
        if start is None:
            continue
        nodes = _between(graph, start, end)
        if not nodes or not all(any(n is m for n in nodes) for m in (*inner, node, *hidden_nodes)):
            continue
        order = {id(n): k for k, n in enumerate(nodes)}
        inner.sort(key=lambda n: order[id(n)])
        activations = tuple(dict.fromkeys(n.op for n in sorted(hidden_nodes, key=lambda n: order[id(n)])
                                          if n.op not in LINKS))
        named = [n.name for n in (*inner, node)]
        found.append(FFN(start, end, node, inner, nodes, in_features(node), activations,
                         mblocks.common_module(named, modules or {}), block_of.get(id(node))))
    return found


def model_ffns(analysis: Analysis) -> list[FFN]:
    """The FFNs of a model's analysis view (found once per Analysis)."""
    return analysis.memo("ffns", None, lambda: ffns(analysis.view, mblocks.node_modules(analysis.model),
                                                    mblocks.model_blocks(analysis), analysis.shapes))


# --------------------------------------------------------------------------- hidden units


@dataclass(frozen=True)
class Part:
    """Rows [offset, offset + length) of an inner layer's outputs that make the hidden units (one per unit)."""

    layer: str
    offset: int


@dataclass
class _State:
    length: int
    parts: dict[Part, tuple[bool, bool]]  # part -> (homogeneous of degree 1 in its rows, reached without activation)


@dataclass
class Units:
    """How an FFN's hidden units are made, for its shards and its exact rescaling.

    `parts` are the rows of inner layers that feed the units (a fused gate-up projection has two);
    `scalable` those in which every unit is positively homogeneous of degree 1 (scaling the rows by
    s > 0 scales the unit by s), the linear ones first; `constants` the per-unit constants on the
    way (biases, scales): (node, input index, layer, first row of the tensor, its length).
    `splits` are the Split/Slice nodes that separate a fused projection's parts.
    """

    hidden: int
    parts: list[Part]
    scalable: list[Part]
    constants: list[tuple[gs.Node, int, str, int, int]] = field(default_factory=list)
    splits: list[gs.Node] = field(default_factory=list)
    gated: bool = False
    reshapes: list[tuple[gs.Node, int]] = field(default_factory=list)  # Reshapes whose target holds the units' count


def _axis_after(node: gs.Node, shapes: dict, axis: int, tensor: gs.Tensor) -> int | None:
    """The feature axis (negative) of `node`'s output, for a link whose input has it at `axis`."""
    out = node.outputs[0]
    din, dout = _dims(shapes, tensor), _dims(shapes, out)
    if din is None or dout is None:
        return None
    if node.op in ("Cast", "Identity", "Dropout"):
        return axis
    if node.op in ("Reshape", "Flatten"):
        if axis != -1 or not din or not dout or din[-1] is None or dout[-1] != din[-1]:
            if node.op == "Reshape" and axis == -1 and din and din[-1] is not None:
                target = int_values(node.inputs[1], shapes)
                if target and target[-1] == din[-1]:
                    return -1
            return None
        return -1
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = int_values(node.inputs[1], shapes)
    if axes is None or any(a is None for a in axes):
        return None
    p = len(din) + axis
    if node.op == "Squeeze":
        removed = sorted(a % len(din) for a in axes)
        if p in removed:
            return None
        return p - sum(a < p for a in removed) - len(dout)
    for a in sorted(a % len(dout) for a in axes):
        if a <= p:
            p += 1
    return p - len(dout)


def _last_is_constant(target: gs.Tensor) -> bool:
    """Whether the last entry of a reshape target is written as a constant (not read with Shape at run time)."""
    if isinstance(target, gs.Constant):
        return True
    node = producer(target)
    while node is not None and node.op in ("Cast", "Identity", "Concat"):
        if node.op == "Concat":
            last = node.inputs[-1]
            if isinstance(last, gs.Constant):
                return True
        else:
            last = node.inputs[0]
        node = producer(last)
    return node is not None and node.op == "Constant"


def _split_ranges(node: gs.Node, shapes: dict, length: int) -> list[tuple[int, int]] | None:
    if node.op == "Slice":
        values = [int_values(t, shapes) if t.name else None for t in node.inputs[1:]]
        starts, ends = values[0], values[1]
        axes = values[2] if len(values) > 2 else None
        steps = values[3] if len(values) > 3 else None
        if not starts or not ends or len(starts) != 1 or None in (starts[0], ends[0]):
            return None
        if steps and steps != [1]:
            return None
        rank = len(_dims(shapes, node.inputs[0]) or ())
        if axes is not None and (len(axes) != 1 or axes[0] is None or (rank and axes[0] % rank != rank - 1)):
            return None
        s, e = slice(starts[0], ends[0]).indices(length)[:2]
        return [(s, max(s, e))]
    sizes = None
    if "split" in node.attrs:
        sizes = list(node.attrs["split"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        sizes = int_values(node.inputs[1], shapes)
    if sizes is None:
        count = len(node.outputs)
        part = -(-length // count)
        sizes = [min(part, length - k * part) for k in range(count)]
    if any(s is None for s in sizes) or sum(sizes) != length:  # type: ignore[arg-type]
        return None
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))  # type: ignore[operator]
        start += size  # type: ignore[operator]
    return ranges


def unit_structure(ffn: FFN, shapes: dict) -> Units | str:
    """The FFN's hidden units (see `Units`), or the reason, naming the node, why they are not made unit by unit."""
    sources = {id(n): (out_features(n), -1) for n in ffn.inner}
    return _trace(ffn.nodes, sources, ffn.down, 0, -1, ffn.hidden, shapes)


def _trace(nodes: Sequence[gs.Node], sources: dict[int, tuple[int, int]], down: gs.Node, down_input: int,
           down_axis: int, hidden: int, shapes: dict) -> Units | str:
    """Follow the units from `sources` (node id -> (output features, their axis)) to input `down_input` of `down`."""
    inner = {id(n): n for n in nodes if id(n) in sources}
    states: dict[str, tuple[_State, int]] = {}  # tensor -> (state, feature axis)
    constants: list[tuple[gs.Node, int, str, int, int]] = []
    splits: list[gs.Node] = []
    reshapes: list[tuple[gs.Node, int]] = []
    final: _State | None = None
    for node in nodes:
        if id(node) in inner:
            out, out_axis = sources[id(node)]
            states[node.outputs[0].name] = (_State(out, {Part(node.name, 0): (True, True)}), out_axis)
            if node.op == "Gemm" and len(node.inputs) > 2 and _is_constant(node.inputs[2]):
                constants.append((node, 2, node.name, 0, out))
            continue
        ins = [t for t in node.inputs if t.name in states]
        if not ins:
            continue
        if node is down:
            found = states.get(node.inputs[down_input].name)
            if found is None or found[1] != down_axis or found[0].length != hidden:
                return f"the down projection '{node.name}' reads its {hidden} units on another axis or length"
            final = found[0]
            continue
        if node.op in _BLIND:
            continue
        state, axis = states[ins[0].name]
        if node.op in LINKS:
            if node.inputs[0] is not ins[0]:
                return f"'{node.name}' ({node.op}) reshapes by the hidden units' values"
            new_axis = _axis_after(node, shapes, axis, node.inputs[0])
            if new_axis is None:
                return f"'{node.name}' ({node.op}) does not keep the hidden units on one axis"
            states[node.outputs[0].name] = (state, new_axis)
            if node.op == "Reshape":
                target = int_values(node.inputs[1], shapes)
                if target is None or (target and target[-1] not in (-1, state.length)):
                    return f"'{node.name}' (Reshape) takes a target shape that is not read from constants and sizes"
                if target and target[-1] == state.length and _last_is_constant(node.inputs[1]):
                    reshapes.append((node, state.length))
        elif node.op in ("Split", "Slice"):
            rank = len(_dims(shapes, node.inputs[0]) or ())
            split_axis = node.attrs.get("axis", 0) if node.op == "Split" else -1
            if node.inputs[0] is not ins[0] or not rank or split_axis % rank != axis % rank:
                return f"'{node.name}' ({node.op}) cuts the hidden units along another axis"
            ranges = _split_ranges(node, shapes, state.length)
            if ranges is None or len(ranges) != len(node.outputs) or len(state.parts) != 1:
                return f"'{node.name}' ({node.op}) cuts the hidden units by sizes read at run time"
            (part, flags), = state.parts.items()
            splits.append(node)
            for (s, e), out in zip(ranges, node.outputs):
                states[out.name] = (_State(e - s, {Part(part.layer, part.offset + s): flags}), axis)
        elif node.op in ACTIVATIONS:
            if node.op == "PRelu" and _constant_size(node.inputs[1]) != 1:
                return f"'{node.name}' (PRelu) has a slope per unit"
            keep = node.op in HOMOGENEOUS
            parts = {p: (f[0] and keep, False) for p, f in state.parts.items()}
            if node.op == "Neg":
                parts = dict(state.parts)
            states[node.outputs[0].name] = (_State(state.length, parts), axis)
        elif node.op in ARITHMETIC:
            other = [t for t in node.inputs if t is not ins[0]]
            result = _arithmetic(node, ins, other, states, axis, shapes, constants)
            if isinstance(result, str):
                return result
            states[node.outputs[0].name] = (result, axis)
        else:
            return f"'{node.name}' ({node.op}) is not a unit-wise op between the FFN's projections"
    if final is None:
        return f"the hidden units of '{down.name}' could not be traced to its inner layers"
    covered: dict[str, int] = {}
    for part in final.parts:
        covered[part.layer] = covered.get(part.layer, 0) + hidden
    for layer in inner.values():
        if covered.get(layer.name) != sources[id(layer)][0]:
            return f"not every output of '{layer.name}' makes a hidden unit"
    # the linear parts first: a unit reached without any activation is rescaled by the plainest construction
    scalable = sorted((p for p, f in final.parts.items() if f[0]), key=lambda p: not final.parts[p][1])
    return Units(hidden, list(final.parts), scalable, constants, splits, gated=len(final.parts) > 1,
                 reshapes=reshapes)


def _arithmetic(node: gs.Node, ins: list[gs.Tensor], other: list[gs.Tensor], states: dict, axis: int, shapes: dict,
                constants: list) -> _State | str:
    state = states[ins[0].name][0]
    if len(ins) == 2:
        second, second_axis = states[ins[1].name]
        if second.length != state.length or second_axis != axis or node.op == "Pow":
            return f"'{node.name}' ({node.op}) combines hidden units that do not line up"
        parts: dict[Part, tuple[bool, bool]] = {}
        for p in {**state.parts, **second.parts}:
            a, b = state.parts.get(p), second.parts.get(p)
            if node.op == "Mul":  # degree 1 in p only if p enters one factor
                flags = (a or b) if (a is None or b is None) else (False, False)
            elif node.op == "Div":
                flags = a if b is None else (False, False)
            else:  # Add/Sub: homogeneous in p only if both terms are
                flags = (a[0] and b[0], a[1] and b[1]) if a is not None and b is not None else (False, False)
            parts[p] = flags  # type: ignore[assignment]
        return _State(state.length, parts)
    (constant,) = other if len(other) == 1 else (None,)
    if constant is None or not _is_constant(constant):
        return f"'{node.name}' ({node.op}) mixes the hidden units with a computed tensor"
    dims = [int(d) for d in constant.shape]
    size = int(np.prod(dims)) if dims else 1
    first = node.inputs[0] is ins[0]
    if size == 1:
        if node.op in ("Mul",) or (node.op == "Div" and first):
            return state
        if node.op == "Pow" and first and float(np.asarray(constant.values).reshape(-1)[0]) == 1.0:
            return state
        return _State(state.length, {p: (False, False) for p in state.parts})
    if dims[-1] != state.length or size != state.length or axis != -1:
        return f"'{node.name}' ({node.op}) applies a constant of shape {dims} to the hidden units"
    if len(state.parts) != 1:
        return f"'{node.name}' ({node.op}) applies a per-unit constant after the projections are combined"
    (part, flags), = state.parts.items()
    constants.append((node, list(node.inputs).index(constant), part.layer, part.offset, state.length))
    if node.op in ("Add", "Sub") or (node.op == "Mul") or (node.op == "Div" and first):
        return state  # a bias scales with its rows; a per-unit factor commutes with a rescaling
    return _State(state.length, {part: (False, False)})


# --------------------------------------------------------------------------- existing mixtures of experts


@dataclass
class MoE:
    """A routed mixture: router layer -> (Softmax) -> TopK k of E -> expert weights picked by the indices."""

    router: gs.Node
    topk: gs.Node
    experts: int
    top_k: int | None
    routing: str  # "softmax-topk", "softmax-topk-renormalised" or "topk-softmax"
    stacked: list[gs.Constant]  # expert weights [E, ...] picked by the routing indices (Gather/GatherND)
    dense: list[FFN]  # whole FFNs weighted by the scattered gates (onnxmorph's dense form), in expert order
    nodes: list[gs.Node]  # the nodes from the router's input to the sum over the chosen experts
    combine: gs.Node | None  # the sum over the chosen experts' outputs
    module: str | None = None
    block: int | None = None
    shared: list[FFN] = field(default_factory=list)  # FFNs added to the sum with weight 1 (shared experts)

    @property
    def name(self) -> str:
        return self.module or self.router.name

    @property
    def form(self) -> str:
        return "stacked" if self.stacked else "dense" if self.dense else "unknown"


def _descendants(start: Sequence[gs.Tensor], limit: int = 4000) -> list[gs.Node]:
    seen: dict[int, gs.Node] = {}
    stack = [n for t in start for n in t.outputs]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(n for t in node.outputs for n in t.outputs)
    return list(seen.values())


def _router_of(topk: gs.Node) -> tuple[gs.Node, bool] | None:
    """(router layer, softmax before TopK) for a TopK over a layer's outputs (through Cast/Softmax/Reshape)."""
    tensor, softmax = topk.inputs[0], False
    for _ in range(8):
        node = producer(tensor)
        if node is None:
            return None
        if layer_info(node) is not None and node.op in ("MatMul", "Gemm"):
            return node, softmax
        if node.op == "Softmax":
            softmax = True
        elif node.op not in LINKS:
            return None
        tensor = node.inputs[0]
    return None


def moes(graph: gs.Graph, ffn_list: Sequence[FFN] = (), modules: dict[str, str] | None = None,
         blocks: Sequence[mblocks.Block] = ()) -> list[MoE]:
    """Every routed mixture of experts of `graph`, in graph order of their TopK."""
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    block_of = {id(n): b.index for b in blocks for n in b.nodes}
    by_output = {f.output.name: f for f in ffn_list}
    found = []
    for topk in graph.nodes:
        if topk.op != "TopK" or len(topk.outputs) < 2:
            continue
        routed = _router_of(topk)
        if routed is None:
            continue
        router, softmax_first = routed
        experts = out_features(router)
        k_values = int_values(topk.inputs[1], {}) if len(topk.inputs) > 1 else [topk.attrs.get("k")]
        top_k = k_values[0] if k_values and len(k_values) == 1 else None
        values_side = _descendants([topk.outputs[0]])
        index_side = _descendants([topk.outputs[1]])
        in_values = {id(n) for n in values_side}
        routing = "softmax-topk" if softmax_first else "topk-softmax"
        if softmax_first and any(n.op == "Div" for n in values_side[:6] if id(n) in in_values):
            routing = "softmax-topk-renormalised"
        if not softmax_first and not any(n.op == "Softmax" for n in values_side):
            routing = "topk"
        joined = [n for n in index_side if id(n) in in_values]
        joined.sort(key=lambda n: order.get(id(n), 0))
        combine = next((n for n in joined if n.op in ("ReduceSum", "Sum")), None)
        start = _link_chain(router.inputs[0])[-1]
        nodes = _between(graph, start, combine.outputs[0]) if combine is not None else []
        # what the routing picks: only up to the sum over the chosen experts (later layers' experts are their own)
        inside = {id(n) for n in nodes}
        stacked = []
        for node in index_side:
            if id(node) in inside and node.op in ("Gather", "GatherND") and _is_constant(node.inputs[0]) \
                    and int(node.inputs[0].shape[0]) == experts and node.inputs[0] not in stacked:
                stacked.append(node.inputs[0])
        dense: list[FFN] = []
        for node in index_side:
            if id(node) in inside and node.op == "Split":
                for out in node.outputs:
                    for mul in out.outputs:
                        if mul.op == "Mul":
                            ffn = next((by_output[t.name] for t in mul.inputs if t.name in by_output), None)
                            if ffn is not None and ffn not in dense:
                                dense.append(ffn)
        shared = [by_output[t.name] for t in combine.inputs if t.name in by_output] if combine is not None else []
        # a dense mixture is named after its experts' module (the FFN it was made of), a stacked one after its nodes'
        names = [n.name for f in dense for n in f.layers] if dense else [router.name] + [n.name for n in nodes]
        found.append(MoE(router, topk, experts, top_k, routing, stacked, dense, nodes, combine,
                         mblocks.common_module(names, modules or {}), block_of.get(id(router)), shared))
    return found


def unrouted_experts(analysis: Analysis) -> list[tuple[int | None, gs.Constant, str]]:
    """(block, weight, what picks its rows) for stacked expert weights [E, ...] that no MoE `moes` found routes.

    Hugging Face's exports pick an expert's rows with a Gather of computed indices; where those indices come from
    something other than a TopK over a router (PhiMoE's sparsemixer takes an ArgMax, masks it and takes another),
    the mixture is not one `moe` can grow, and its refusal should say so rather than that the block has no experts.
    """
    routed = {id(w) for m in model_moes(analysis) for w in m.stacked}
    block_of = {id(n): b.index for b in mblocks.model_blocks(analysis) for n in b.nodes}
    found: list[tuple[int | None, gs.Constant, str]] = []
    for node in analysis.view.nodes:
        if node.op not in ("Gather", "GatherND") or len(node.inputs) < 2 or not _is_constant(node.inputs[0]):
            continue
        weight, indices = node.inputs[0], node.inputs[1]
        if len(weight.shape) != 3 or id(weight) in routed or _is_constant(indices) \
                or any(w is weight for _, w, _ in found):
            continue
        pickers: list[str] = []
        stack, seen = [indices], set()
        while stack and len(seen) < 200:  # the ops that make the indices: ArgMax, TopK, ...
            tensor = stack.pop()
            if tensor.name in seen:
                continue
            seen.add(tensor.name)
            maker = producer(tensor)
            if maker is None:
                continue
            if maker.op in ("ArgMax", "ArgMin", "TopK", "NonZero"):
                pickers.append(f"{maker.op} '{maker.name}'")
                continue
            if maker.op not in ("Shape", "Size"):
                stack.extend(t for t in maker.inputs if t.name and not _is_constant(t))
        if pickers:
            found.append((block_of.get(id(node)), weight, ", ".join(dict.fromkeys(pickers))))
    return found


def model_moes(analysis: Analysis) -> list[MoE]:
    """The mixtures of experts of a model's analysis view (found once per Analysis)."""
    return analysis.memo("moes", None, lambda: moes(analysis.view, model_ffns(analysis),
                                                    mblocks.node_modules(analysis.model),
                                                    mblocks.model_blocks(analysis)))


@dataclass
class StackedUnits:
    """The hidden units of a stacked MoE's experts: `units` traced from its MatMuls, and where their weights are.

    `weights` maps each inner MatMul to (stacked weight, axis of its output features); `down` is
    (stacked weight, axis of its input features) of the down projection.
    """

    units: Units
    weights: dict[str, tuple[gs.Constant, int]]
    down: tuple[gs.Constant, int]


def _stacked_operand(node: gs.Node, experts: int) -> tuple[gs.Constant, bool] | None:
    """(stacked weight, is the left operand) of a MatMul that multiplies by the experts' picked weights."""
    for k in (0, 1):
        source = producer(node.inputs[k]) if len(node.inputs) > k else None
        if source is not None and source.op in ("Gather", "GatherND") and _is_constant(source.inputs[0]) \
                and len(source.inputs[0].shape) == 3 and int(source.inputs[0].shape[0]) == experts:
            return source.inputs[0], k == 0
    return None


def stacked_units(moe: MoE, shapes: dict) -> StackedUnits | str:
    """How the stacked experts of `moe` make their hidden units, or why that is not traced."""
    matmuls = [(n, _stacked_operand(n, moe.experts)) for n in moe.nodes if n.op == "MatMul"]
    matmuls = [(n, found) for n, found in matmuls if found is not None]
    if len(matmuls) < 2:
        return f"MoE '{moe.name}': its experts' projections are not MatMuls by stacked weights"
    made = {id(n): {id(d) for d in _descendants([n.outputs[0]])} for n, _ in matmuls}
    downs = [(n, f) for n, f in matmuls if any(id(n) in made[id(m)] for m, _ in matmuls if m is not n)]
    if len(downs) != 1:
        return f"MoE '{moe.name}': no single down projection among its experts' MatMuls"
    down, (down_weight, down_left) = downs[0]
    sources: dict[int, tuple[int, int]] = {}
    weights: dict[str, tuple[gs.Constant, int]] = {}
    for node, (weight, left) in matmuls:
        if node is down:
            continue
        # W @ x: W is [E, out, in] and the output's features are on axis -2; x @ W: W is [E, in, out], axis -1
        out_axis = 1 if left else 2
        sources[id(node)] = (int(weight.shape[out_axis]), -2 if left else -1)
        weights[node.name] = (weight, out_axis)
    hidden = int(down_weight.shape[2 if down_left else 1])
    units = _trace(moe.nodes, sources, down, 1 if down_left else 0, -2 if down_left else -1, hidden, shapes)
    if isinstance(units, str):
        return units
    return StackedUnits(units, weights, (down_weight, 2 if down_left else 1))


# --------------------------------------------------------------------------- for inspect


def summary(analysis: Analysis) -> dict[str, list[dict]]:
    """What `inspect` lists under "experts": every FFN (what upcycling would copy) and every MoE with its experts.

    The routing groups of one mixture (onnxmorph's shards, one router each) are listed as one MoE.
    """
    moe_list = model_moes(analysis)
    in_moe = {id(f) for m in moe_list for f in (*m.dense, *m.shared)}
    ffn_rows = []
    for ffn in model_ffns(analysis):
        if id(ffn) in in_moe:
            continue
        ffn_rows.append({"name": ffn.name, "block": ffn.block, "hidden": ffn.hidden,
                         "activations": list(ffn.activations), "inner": [n.name for n in ffn.inner],
                         "down": ffn.down.name, "input": ffn.input.name, "output": ffn.output.name})
    merged: dict[str, dict] = {}
    for moe in moe_list:
        key = moe.combine.name if moe.combine is not None else moe.router.name
        row = merged.setdefault(key, {
            "name": moe.name, "block": moe.block, "experts": 0, "top_k": 0, "groups": 0, "routing": moe.routing,
            "form": moe.form, "routers": [], "expert_weights": [], "experts_list": []})
        row["experts"] += moe.experts
        row["top_k"] += moe.top_k or 0
        row["groups"] += 1
        row["routers"].append(moe.router.name)
        row["expert_weights"] += [{"name": w.name, "shape": [int(d) for d in w.shape]} for w in moe.stacked]
        row["experts_list"] += [{"name": f.name, "down": f.down.name, "hidden": f.hidden} for f in moe.dense]
        row.setdefault("shared", [])
        row["shared"] += [{"name": f.name, "down": f.down.name, "hidden": f.hidden} for f in moe.shared
                          if f.down.name not in {e["down"] for e in row["shared"]}]
    return {"ffns": ffn_rows, "moes": list(merged.values())}
