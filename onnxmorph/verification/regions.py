"""Verification by regions: a child checked against its parent one changed subgraph at a time.

A model larger than memory cannot be run whole (onnxruntime holds the pages of every weight it
reads), but a morph changes a small part of it. This compares the two graphs and checks the
child in two steps, each within the memory of the largest changed part:

1. everything outside the changed regions is the parent's: each node that is not changed has
   the parent's definition (op, attributes, input and output names), and each weight the two
   models share by name holds the same bytes (compared file to file, a chunk at a time);
2. each changed region computes the parent's function: its subgraph in the child and the
   subgraph of the parent that computes the same boundary tensors run in onnxruntime on the
   same inputs (seeded random values at the region's boundary; the model's own inputs where the
   region reaches them) and their outputs are compared as `verify` compares a model's.

A region is a connected set of changed nodes of the child: those that are new or differ from the
parent's node of the same output name or read a weight that differs, and the readers of any
tensor they make that the parent does not have with the same type and shape (a widened
activation). A tensor the region makes that the parent also has, with its type and shape, and
that unchanged nodes read is an output of the region: the claim that it equals the parent's is
what each region check tests, and it is what makes the two steps together prove the whole model
(every unchanged node then reads equal inputs). Boundary tensors computed from the model's
inputs without large weights (shapes, positions, masks) are computed by their own nodes, taken
into both regions; those computed from large weights are drawn.

What it does not do: run the whole model end to end. A region is checked on random boundary
values, not on the activations a real input would give it (which a region check cannot hold
without running what is in front of it); the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxmorph.io import streaming
from onnxmorph.io.proto import declared_bytes, skeleton
from onnxmorph.numerics.dtypes import is_float
from onnxmorph.verification.report import OutputCheck, Report, compare, default_tolerances, output_scale
from onnxmorph.verification.runtime import RuntimeProblem, Session, missing_kernel

log = logging.getLogger("onnxmorph")

# Weights of at least this many bytes are "large": what they feed is drawn at a region's boundary
# instead of computed (computing it means running the model in front of the region).
LARGE_WEIGHT_BYTES = 2**16
_OUTPUT_SUFFIX = "/onnxmorph_region_output"


@dataclass
class Region:
    """One changed region: its nodes on each side, its boundary and its outputs (the same names on both sides)."""

    child_nodes: list[int] = field(default_factory=list)  # indices in the child's graph.node
    parent_nodes: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def describe(self, child: onnx.GraphProto) -> str:
        names = [child.node[k].name or child.node[k].output[0] for k in self.child_nodes[:2]]
        more = f" and {len(self.child_nodes) - 2} more" if len(self.child_nodes) > 2 else ""
        return ", ".join(names) + more


@dataclass
class Comparison:
    """What comparing the two graphs found: the regions and what is shared unchanged."""

    regions: list[Region]
    unchanged_nodes: int
    identical_weights: int
    identical_bytes: int
    problems: list[str]


def _key(node: onnx.NodeProto) -> str:
    # A node is known by its first output (SSA: one producer per name); names may repeat or be empty.
    return node.output[0] if node.output and node.output[0] else f"node:{node.name}"


def _definition(node: onnx.NodeProto) -> bytes:
    bare = onnx.NodeProto()
    bare.CopyFrom(node)
    bare.ClearField("name")
    bare.ClearField("doc_string")
    bare.ClearField("metadata_props")
    return bare.SerializeToString(deterministic=True)


def tensor_types(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, tuple]]:
    """{tensor: (element type, shape)} by onnx shape inference with the inputs' shapes given (unknown dims None)."""
    probe = skeleton(model)  # the weights' dims, none of their data
    del probe.graph.value_info[:]
    for info in probe.graph.input:
        if info.name in input_shapes:
            dims = info.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[info.name]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as exc:  # the shapes stay unknown: regions then grow (see `compare_graphs`)
        log.debug("shape inference failed: %s", exc)
        inferred = probe
    found: dict[str, tuple[int, tuple]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = info.type.tensor_type
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        found[info.name] = (tt.elem_type, shape)
    for tensor in model.graph.initializer:
        found[tensor.name] = (tensor.data_type, tuple(int(d) for d in tensor.dims))
    return found


def _known(entry: tuple[int, tuple] | None) -> bool:
    return entry is not None and entry[1] is not None and all(d is not None for d in entry[1])


def compare_graphs(parent: onnx.ModelProto, child: onnx.ModelProto,
                   input_shapes: Mapping[str, Sequence[int]]) -> Comparison:
    """The changed regions of `child` against `parent` (main graphs; subgraphs count as node attributes)."""
    pg, cg = parent.graph, child.graph
    p_nodes = {_key(n): k for k, n in enumerate(pg.node)}
    c_nodes = {_key(n): k for k, n in enumerate(cg.node)}
    p_weights = {t.name: t for t in pg.initializer}
    c_weights = {t.name: t for t in cg.initializer}
    same_weight: dict[str, bool] = {}
    identical_bytes = 0
    for name, tensor in c_weights.items():
        if name in p_weights:
            same_weight[name] = streaming.same_data(p_weights[name], tensor)
            if same_weight[name]:
                identical_bytes += declared_bytes(tensor) or 0
    c_types, p_types = tensor_types(child, input_shapes), tensor_types(parent, input_shapes)
    c_producer = {out: k for k, n in enumerate(cg.node) for out in n.output if out}
    p_producer = {out: k for k, n in enumerate(pg.node) for out in n.output if out}
    c_readers: dict[str, list[int]] = {}
    for k, node in enumerate(cg.node):
        for name in node.input:
            c_readers.setdefault(name, []).append(k)
    c_outputs = {o.name for o in cg.output}

    changed: set[int] = set()
    for key, k in c_nodes.items():
        node = cg.node[k]
        if key not in p_nodes or _definition(node) != _definition(pg.node[p_nodes[key]]) or any(
                name in c_weights and not same_weight.get(name, False) for name in node.input):
            changed.add(k)
    # A tensor a changed node makes that the parent lacks with its type and shape: its readers change too.
    stack = list(changed)
    while stack:
        k = stack.pop()
        for out in cg.node[k].output:
            if not out:
                continue
            here, there = c_types.get(out), p_types.get(out)
            if out in p_producer and _known(here) and here == there:
                continue  # an output of the region (if it is read outside): claimed equal, and checked
            for reader in c_readers.get(out, []):
                if reader not in changed:
                    changed.add(reader)
                    stack.append(reader)
    unchanged = [k for k in range(len(cg.node)) if k not in changed]
    p_changed = {k for key, k in p_nodes.items() if key not in c_nodes or c_nodes[key] in changed}

    # Regions: connected through the tensors changed nodes share, on either side, and by node key.
    parent_of: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        while parent_of.setdefault(x, x) != x:
            parent_of[x] = parent_of[parent_of[x]]
            x = parent_of[x]
        return x

    def union(a: tuple[str, int], b: tuple[str, int]) -> None:
        parent_of[find(a)] = find(b)

    for side, graph, members, producer in (("c", cg, changed, c_producer), ("p", pg, p_changed, p_producer)):
        for k in members:
            find((side, k))
            for name in graph.node[k].input:
                j = producer.get(name)
                if j is not None and j in members:
                    union((side, k), (side, j))
    for k in p_changed:
        key = _key(pg.node[k])
        if key in c_nodes and c_nodes[key] in changed:
            union(("p", k), ("c", c_nodes[key]))
        for out in pg.node[k].output:  # the same tensor made on both sides
            j = c_producer.get(out)
            if j is not None and j in changed:
                union(("p", k), ("c", j))
    groups: dict[tuple[str, int], Region] = {}
    for k in sorted(changed):
        groups.setdefault(find(("c", k)), Region()).child_nodes.append(k)
    for k in sorted(p_changed):
        groups.setdefault(find(("p", k)), Region()).parent_nodes.append(k)
    regions = []
    problems = []
    for region in groups.values():
        members = set(region.child_nodes)
        made = [out for k in region.child_nodes for out in cg.node[k].output if out]
        region.outputs = [out for out in made if out in c_outputs or any(
            reader not in members for reader in c_readers.get(out, []))]
        p_made = {out for k in region.parent_nodes for out in pg.node[k].output if out}
        for out in region.outputs:
            if out not in p_made and out not in p_producer and out not in {i.name for i in pg.input}:
                problems.append(f"the child's tensor '{out}' (made by {region.describe(cg)}) is read by unchanged "
                                "nodes but the parent has no such tensor")
        if region.outputs or region.parent_nodes:
            regions.append(region)
    identical = sum(1 for v in same_weight.values() if v)
    return Comparison(regions, len(unchanged), identical, identical_bytes, problems)


class _Graph:
    """Lookups on one side's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.producer = {out: k for k, n in enumerate(self.graph.node) for out in n.output if out}
        self.weights = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}


def _large_fed(child: _Graph) -> set[str]:
    """Tensors whose values come from a large weight (through anything but Shape and Size)."""
    large = {name for name, t in child.weights.items()
             if is_float(_np_type(t.data_type)) and (declared_bytes(t) or 0) >= LARGE_WEIGHT_BYTES}
    fed: set[str] = set(large)
    for node in child.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in fed for name in node.input):
            fed.update(out for out in node.output if out)
    return fed


def _np_type(elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return np.dtype(np.uint8)


@dataclass
class _Plan:
    """A region made runnable: the nodes of each side, the tensors drawn and those fed from the model's inputs."""

    parent_nodes: list[int]
    child_nodes: list[int]
    drawn: dict[str, tuple[int, tuple]]  # name -> (element type, shape)
    inputs: list[str]  # the model's own inputs the region reads
    problem: str | None = None


def _plan(region: Region, parent: _Graph, child: _Graph, types: Mapping[str, tuple[int, tuple]],
          large: set[str]) -> _Plan:
    parent_nodes, child_nodes = set(region.parent_nodes), set(region.child_nodes)
    drawn: dict[str, tuple[int, tuple]] = {}
    inputs: set[str] = set()
    problem = None
    stack = [(side, k) for side, ks in (("p", parent_nodes), ("c", child_nodes)) for k in ks]
    seen: set[str] = set()
    while stack:
        side, k = stack.pop()
        graph = parent if side == "p" else child
        members = parent_nodes if side == "p" else child_nodes
        for name in graph.graph.node[k].input:
            if not name or name in seen:
                continue
            if name in graph.weights:
                continue
            j = graph.producer.get(name)
            if j is not None and j in members:
                continue
            seen.add(name)
            if name in graph.inputs and j is None:
                inputs.add(name)
                continue
            entry = types.get(name)
            if name in large and entry is not None and is_float(_np_type(entry[0])) and _known(entry):
                drawn[name] = entry
                continue
            # computed without large weights (or not a float, or of a shape inference does not know: values
            # cannot be drawn for it): its producer joins both sides
            jc, jp = child.producer.get(name), parent.producer.get(name)
            if jc is None or jp is None:
                problem = f"boundary tensor '{name}' has no producer on both sides"
                continue
            if jc not in child_nodes:
                child_nodes.add(jc)
                stack.append(("c", jc))
            if jp not in parent_nodes:
                parent_nodes.add(jp)
                stack.append(("p", jp))
    return _Plan(sorted(parent_nodes), sorted(child_nodes), drawn, sorted(inputs), problem)


def _region_model(side: _Graph, nodes: list[int], plan: _Plan, outputs: Sequence[str],
                  types: Mapping[str, tuple[int, tuple]]) -> onnx.ModelProto:
    """A model of `nodes` of one side: the drawn tensors and model inputs as inputs, `outputs` as outputs."""
    graph = onnx.GraphProto(name="region")
    graph.node.extend(side.graph.node[k] for k in nodes)
    made = {out for k in nodes for out in side.graph.node[k].output}
    read = {name for k in nodes for name in side.graph.node[k].input}
    for name in [*plan.inputs, *sorted(plan.drawn)]:
        if name in read or name in outputs:
            elem, shape = plan.drawn.get(name) or types.get(name) or (0, None)
            for info in side.graph.input:
                if info.name == name:
                    graph.input.append(info)
                    break
            else:
                graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(shape) if shape else None))
    graph.initializer.extend(side.weights[name] for name in sorted(read) if name in side.weights)
    for name in outputs:
        out = name
        if name not in made:  # the region passes a boundary tensor through unchanged: an Identity shows it
            out = name + _OUTPUT_SUFFIX
            graph.node.append(onnx.helper.make_node("Identity", [name], [out]))
        elem = types.get(name, (0, None))[0]
        graph.output.append(onnx.helper.make_tensor_value_info(out, elem, None))
    model = onnx.helper.make_model(graph, opset_imports=side.model.opset_import)
    model.ir_version = side.model.ir_version
    model.functions.extend(side.model.functions)
    return model


def _draw(entry: tuple[int, tuple], rng: np.random.Generator) -> np.ndarray:
    elem, shape = entry
    values = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    return values.astype(_np_type(elem))


def verify_regions(parent: onnx.ModelProto, child: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                   report: Report, *, atol: float | None, rtol: float | None, seed: int,
                   float32: bool = False) -> bool:
    """Check `child` against `parent` region by region, filling `report`; returns whether float32 copies ran.

    `feeds` are the model inputs of each trial (their shapes fix the dynamic dimensions).
    """
    shapes = {name: list(array.shape) for name, array in feeds[0].items()}
    found = compare_graphs(parent, child, shapes)
    report.problems.extend(found.problems)
    report.unchanged_nodes = found.unchanged_nodes
    report.identical_weights = found.identical_weights
    report.identical_weight_bytes = found.identical_bytes
    p_side, c_side = _Graph(parent), _Graph(child)
    types = {**tensor_types(parent, shapes), **tensor_types(child, shapes)}
    large = _large_fed(c_side) | _large_fed(p_side)
    for number, region in enumerate(found.regions, 1):
        plan = _plan(region, p_side, c_side, types, large)
        label = f"region {number}"
        summary: dict[str, Any] = {"region": number, "child_nodes": len(region.child_nodes),
                                   "parent_nodes": len(region.parent_nodes), "first": region.describe(child.graph),
                                   "outputs": list(region.outputs), "drawn": sorted(plan.drawn),
                                   "model_inputs": plan.inputs}
        report.regions.append(summary)
        if plan.problem:
            report.problems.append(f"{label} ({region.describe(child.graph)}): {plan.problem}")
            continue
        if not region.outputs:  # nodes whose results nothing reads, on either side: no output depends on them
            summary["note"] = "nothing reads what these nodes make: no output depends on them"
            continue
        log.info("verifying %s of %d: %d child nodes, %d parent nodes, %d output(s)", label, len(found.regions),
                 len(plan.child_nodes), len(plan.parent_nodes), len(region.outputs))
        models = {"parent": _region_model(p_side, plan.parent_nodes, plan, region.outputs, types),
                  "child": _region_model(c_side, plan.child_nodes, plan, region.outputs, types)}
        trials = []
        for t, feed in enumerate(feeds):
            rng = np.random.default_rng([seed, t, number])
            values = {name: _draw(entry, rng) for name, entry in sorted(plan.drawn.items())}
            values.update({name: feed[name] for name in plan.inputs})
            trials.append(values)
        try:
            results, float32 = _run_both(models, trials, float32, label)
        except RuntimeProblem as exc:
            report.problems.append(f"{label}: {exc}")
            continue
        expected, actual = results
        for k, name in enumerate(region.outputs):
            first = expected[0][k]
            declared = _np_type(types.get(name, (1, None))[0])
            tol_atol, tol_rtol = default_tolerances(declared if is_float(declared) else first.dtype)
            scale = output_scale(trial[k] for trial in expected)
            check = OutputCheck(name=f"{label}: {name}", shape=list(first.shape), dtype=str(declared),
                                atol=tol_atol * max(1.0, scale) if atol is None else atol,
                                rtol=tol_rtol if rtol is None else rtol)
            for exp, act in zip(expected, actual):
                compare(check, exp[k], act[k])
            report.outputs.append(check)
        streaming.unmap_all()
    return float32


def _run_both(models: Mapping[str, onnx.ModelProto], trials: Sequence[Mapping[str, np.ndarray]], float32: bool,
              label: str) -> tuple[tuple[list[list[np.ndarray]], list[list[np.ndarray]]], bool]:
    """Each side's outputs on every trial (the parent's region, then the child's, one session at a time)."""
    for attempt in (float32, True) if not float32 else (True,):
        try:
            results = []
            for role in ("parent", "child"):
                session = Session(models[role], f"{role}'s {label}", float32=attempt)
                try:
                    results.append([session.run(values, f"{role}'s {label}") for values in trials])
                finally:
                    session.close()
            return (results[0], results[1]), attempt
        except RuntimeProblem as exc:
            if attempt or not missing_kernel(exc):
                raise
    raise AssertionError("unreachable")
