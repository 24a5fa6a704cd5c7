"""`diff`: what a morph changed between a parent and a child model, read from their headers."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import onnx
from onnx import numpy_helper

from onnxmorph import folding, receipt
from onnxmorph import io as mio
from onnxmorph.errors import one_line
from onnxmorph.verify import read_model_file

Source = Union[str, os.PathLike, onnx.ModelProto]
Dims = tuple[Union[int, str, None], ...]

# Node names a pass makes: `<layer or tensor>/morph_<kind>[_k]/...` (see graph.Namer, build.fresh_scope).
_MORPH_SCOPE = re.compile(r"/morph_([a-z]+)(?:_\d+)?(?=/|$)")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class NodeView:
    """One node of the main graph as the diff sees it (weights are inputs named in ModelView.weights)."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, str]


@dataclass
class ModelView:
    """A model's main graph without its weights' values: nodes, weight dims, inferred shapes, receipt."""

    path: str
    nodes: dict[str, NodeView]
    weights: dict[str, Dims | None]  # None: a folded weight whose shape could not be inferred
    float_weights: set[str]
    shapes: dict[str, Dims | None]
    batch_dims: set[str]
    history: list[dict[str, Any]]
    unnamed_nodes: int = 0
    shape_note: str = ""
    producer: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes.values():
            for out in node.outputs:
                self.producer[out] = node.name
            for name in node.inputs:
                self.consumers.setdefault(name, []).append(node.name)

    def data_inputs(self, node: NodeView) -> list[str]:
        """The inputs of `node` that are not weights (the edges of the drawn graph)."""
        return [name for name in node.inputs if name and name not in self.weights]

    def node_weights(self, node: NodeView) -> list[tuple[int, str, Dims | None]]:
        """(input slot, weight name, dims) of every weight `node` reads."""
        return [(k, name, self.weights[name]) for k, name in enumerate(node.inputs) if name in self.weights]


# --------------------------------------------------------------------------- reading


def model_view(source: Source) -> ModelView:
    """Read a model for the diff: from a path its header only (weights' bytes skipped), or a ModelProto.

    Weights made by Constant/ConstantOfShape/shape ops become weights and unnamed nodes get the
    names `onnxmorph.io.normalize` gives them, without evaluating anything: a parent file and the
    normalised child it made then use the same names. Shapes come from onnx shape inference on
    the weightless header; where it fails or leaves a dimension open, the shape stays unknown.
    """
    if isinstance(source, onnx.ModelProto):
        header, path = mio.skeleton(source), "<model>"
    else:
        header, path = read_model_file(source, check=False).header, str(source)
    shapes, elem_types, note = _infer_shapes(header)
    graph = header.graph
    weights: dict[str, Dims | None] = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    for t in graph.initializer:
        elem_types[t.name] = t.data_type
    outputs = {o.name for o in graph.output}
    kept = onnx.GraphProto()
    constants = set(weights)
    for node in graph.node:
        if folding.foldable(node, constants, outputs):
            weights[node.output[0]] = shapes.get(node.output[0]) or _constant_dims(node, graph)
            constants.add(node.output[0])
        else:
            kept.node.append(node)
    unnamed = sum(1 for node in kept.node if not node.name)
    folding.name_nodes(kept)
    nodes: dict[str, NodeView] = {}
    for n in kept.node:
        name, k = n.name, 1
        while name in nodes:  # names should be unique, but the format does not enforce it
            k += 1
            name = f"{n.name}#{k}"
        nodes[name] = NodeView(name, _op_label(n), list(n.input), list(n.output), _attrs(n))
    batch = set()
    for info in mio.true_inputs(header):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            batch.add(dims[0].dim_param)
    return ModelView(
        path=path, nodes=nodes, weights=weights,
        float_weights={w for w in weights if elem_types.get(w) in _FLOAT_TYPES},
        shapes=shapes, batch_dims=batch, history=receipt.history(header), unnamed_nodes=unnamed, shape_note=note,
    )


def _infer_shapes(header: onnx.ModelProto) -> tuple[dict[str, Dims | None], dict[str, int], str]:
    """{tensor: dims} (int, symbol or None per axis), {tensor: element type}, and why shapes are missing."""
    note = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(header, check_type=False, strict_mode=False)
    except Exception as exc:  # shape inference raises many types; the diff still works without shapes
        inferred, note = header, f"shape inference failed ({one_line(exc)}); FLOPs are unknown"
    shapes: dict[str, Dims | None] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        tt = info.type.tensor_type
        types[info.name] = tt.elem_type
        if not tt.HasField("shape"):
            shapes.setdefault(info.name, None)
            continue
        shapes[info.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes, types, note


def _constant_dims(node: onnx.NodeProto, graph: onnx.GraphProto) -> Dims | None:
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return tuple(int(d) for d in node.attribute[0].t.dims)
    if node.op_type == "ConstantOfShape":
        tensor = next((t for t in graph.initializer if t.name == node.input[0]), None)
        try:
            return tuple(int(d) for d in numpy_helper.to_array(tensor).reshape(-1))
        except Exception:  # no such initializer, or its data left out: the shape stays unknown
            return None
    return None


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _attrs(node: onnx.NodeProto) -> dict[str, str]:
    out = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[attr.name] = "<subgraph>"
            continue
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = f"tensor {_dims_text(tuple(attr.t.dims))}"
            continue
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        text = str(value)
        out[attr.name] = text if len(text) <= 120 else text[:117] + "..."
    return out


def _dims_text(dims: Dims | None) -> str:
    if dims is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


# --------------------------------------------------------------------------- counting


def parameter_count(view: ModelView) -> int:
    """Elements of the float weights the graph reads (integer shape tensors are not parameters).

    A weight whose shape is unknown (see `ModelView.weights`) is not counted.
    """
    used = {name for node in view.nodes.values() for name in node.inputs}
    return sum(math.prod(dims) for w in view.float_weights if w in used
               for dims in [view.weights[w]] if dims is not None and all(isinstance(d, int) for d in dims))


def node_flops(view: ModelView, node: NodeView) -> int | None:
    """FLOPs of one Conv, ConvTranspose, Gemm or MatMul per example (a multiply-add is 2); None if unknown.

    A leading symbolic dimension of the graph inputs (the batch) counts as 1; any other unknown
    dimension makes the node's count unknown rather than guessed. Other ops count 0.
    """
    if node.op not in _COUNTED_OPS:
        return 0
    dims = [_known(view, name) for name in node.inputs[:2]] + [_known(view, t) for t in node.outputs[:1]]
    x, w, y = (dims + [None] * 3)[:3]
    attrs = node.attrs
    if node.op == "Conv" and w and y:
        return 2 * math.prod(y) * math.prod(w[1:])
    if node.op == "ConvTranspose" and x and w:
        return 2 * math.prod(x) * math.prod(w[1:])
    if node.op == "Gemm" and x and w and len(x) == 2 and len(w) == 2:
        m, k = (x[1], x[0]) if attrs.get("transA") == "1" else (x[0], x[1])
        n = w[0] if attrs.get("transB") == "1" else w[1]
        return 2 * m * k * n
    if node.op == "MatMul" and x and y is not None:
        return 2 * math.prod(y) * x[-1]
    return None


def _known(view: ModelView, name: str) -> list[int] | None:
    dims = view.weights.get(name) if name in view.weights else view.shapes.get(name)
    if dims is None:
        return None
    out = []
    for k, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif k == 0 and d is not None and d in view.batch_dims:
            out.append(1)
        else:
            return None
    return out


def flop_count(view: ModelView) -> tuple[int, list[str]]:
    """Total FLOPs per example of the counted ops, and the nodes whose count is unknown."""
    total, unknown = 0, []
    for node in view.nodes.values():
        flops = node_flops(view, node)
        if flops is None:
            unknown.append(node.name)
        else:
            total += flops
    return total, unknown


# --------------------------------------------------------------------------- comparing


@dataclass
class Diff:
    """What changed from `parent` to `child`; `to_dict()` is the JSON form, `str()` the text form."""

    parent: ModelView
    child: ModelView
    added: list[str]
    removed: list[str]
    rewired: list[dict[str, Any]]
    modified: list[dict[str, Any]]
    weights: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    mapping: dict[str, list[str]]
    history: list[dict[str, Any]]
    receipt_note: str = ""

    def changes(self, side: str) -> dict[str, list[str]]:
        """{node: change tags} for one side ('parent' or 'child'): added/removed, grown, modified, rewired."""
        tags: dict[str, list[str]] = {}
        view = self.parent if side == "parent" else self.child
        for name in self.removed if side == "parent" else self.added:
            tags.setdefault(name, []).append("removed" if side == "parent" else "added")
        key = "old_name" if side == "parent" else "name"
        for change in self.weights:
            for node in view.consumers.get(change.get(key) or change["name"], []):
                tags.setdefault(node, []).append("grown")
        for kind, entries in (("modified", self.modified), ("rewired", self.rewired)):
            for entry in entries:
                tags.setdefault(entry["node"], []).append(kind)
        return {name: sorted(set(t), key=_TAG_ORDER.index) for name, t in tags.items()}

    def new_weights(self) -> dict[str, list[Any]]:
        """{weight: dims} of the weights the added nodes read that the parent does not have."""
        out = {}
        for name in self.added:
            for _, weight, dims in self.child.node_weights(self.child.nodes[name]):
                if weight not in self.parent.weights:
                    out[weight] = list(dims)
        return out

    def to_dict(self) -> dict[str, Any]:
        (p_flops, p_unknown), (c_flops, c_unknown) = flop_count(self.parent), flop_count(self.child)
        return {
            "parent": self.parent.path,
            "child": self.child.path,
            "summary": {
                "nodes": [len(self.parent.nodes), len(self.child.nodes)],
                "parameters": [parameter_count(self.parent), parameter_count(self.child)],
                "flops_per_example": [p_flops, c_flops],
                "flops_unknown_nodes": [p_unknown, c_unknown],
                "shape_notes": [self.parent.shape_note, self.child.shape_note],
            },
            "added": self.added,
            "removed": self.removed,
            "rewired": self.rewired,
            "modified": self.modified,
            "weights_changed": self.weights,
            "new_weights": self.new_weights(),
            "groups": self.groups,
            "mapping": self.mapping,
            "history": self.history,
            "receipt_note": self.receipt_note,
            "unnamed_parent_nodes": self.parent.unnamed_nodes,
        }

    def __str__(self) -> str:
        from onnxmorph.difftext import format_diff

        return format_diff(self)


_TAG_ORDER = ["added", "removed", "grown", "modified", "rewired"]


def diff(parent: Source, child: Source) -> Diff:
    """Compare two models (paths, read from their headers, or ModelProtos)."""
    p, c = model_view(parent), model_view(child)
    history, note = _new_history(p, c, parent if not isinstance(parent, onnx.ModelProto) else None)
    added = [n for n in c.nodes if n not in p.nodes]
    removed = [n for n in p.nodes if n not in c.nodes]
    rewired, modified = _node_changes(p, c)
    groups = _groups(p, c, added, [s for record in history for s in record.get("steps", [])])
    mapping: dict[str, list[str]] = {n: [n] if n in c.nodes else [] for n in p.nodes}
    for group in groups:
        if group["origin"] is not None:
            mapping.setdefault(group["origin"], []).extend(group["nodes"])
    return Diff(p, c, added, removed, rewired, modified, _weight_changes(p, c), groups, mapping, history, note)


def _node_changes(p: ModelView, c: ModelView) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes in both whose data inputs/outputs differ (rewired), and whose op or attributes differ."""
    rewired, modified = [], []
    for name, old in p.nodes.items():
        new = c.nodes.get(name)
        if new is None:
            continue
        entry: dict[str, Any] = {"node": name}
        if p.data_inputs(old) != c.data_inputs(new):
            entry["inputs"] = [p.data_inputs(old), c.data_inputs(new)]
        if old.outputs != new.outputs:
            entry["outputs"] = [old.outputs, new.outputs]
        if len(entry) > 1:
            rewired.append(entry)
        attrs = {k: [old.attrs.get(k), new.attrs.get(k)] for k in sorted(set(old.attrs) | set(new.attrs))
                 if old.attrs.get(k) != new.attrs.get(k)}
        if attrs or old.op != new.op:
            modified.append({"node": name, "op": [old.op, new.op], "attributes": attrs})
    return rewired, modified


def _weight_changes(p: ModelView, c: ModelView) -> list[dict[str, Any]]:
    """Weights whose dims changed: by name, then by input slot of a node in both (a renamed weight)."""
    out: dict[str, dict[str, Any]] = {}
    for name, dims in c.weights.items():
        if name in p.weights and p.weights[name] != dims:
            out[name] = {"name": name, "old": list(p.weights[name]), "new": list(dims),
                         "nodes": c.consumers.get(name, [])}
    for node_name, old in p.nodes.items():
        new = c.nodes.get(node_name)
        if new is None:
            continue
        for k, (a, b) in enumerate(zip(old.inputs, new.inputs)):
            if a != b and a in p.weights and b in c.weights and p.weights[a] != c.weights[b] and b not in out:
                out[b] = {"name": b, "old_name": a, "old": list(p.weights[a]), "new": list(c.weights[b]),
                          "nodes": [node_name], "input": k}
    return list(out.values())


@dataclass(frozen=True)
class MorphOrigin:
    """Where a node a pass made comes from, read from its name `<scope>/morph_<kind>/...`."""

    kind: str  # the innermost morph: deepen, widen, subnet, skip, ...
    scope: str  # what that morph was applied to (a node or tensor name, possibly made by an earlier morph)
    node: str | None  # the parent node it replaced or grew from, when the name leads to one


def morph_origin(name: str, parent: ModelView) -> MorphOrigin | None:
    """The MorphOrigin of a node a pass made, or None when its name has no `/morph_<kind>` segment.

    The innermost segment gives the morph; the longest prefix before any segment that names a
    parent node (or a tensor a parent node produces) gives the parent node, so a node made by
    deepening a node an earlier morph made still points at the parent's layer.
    """
    matches = list(_MORPH_SCOPE.finditer(name))
    if not matches:
        return None
    node = None
    for match in matches:
        prefix = name[:match.start()]
        node = (prefix if prefix in parent.nodes else parent.producer.get(prefix)) or node
    return MorphOrigin(matches[-1].group(1), name[:matches[-1].start()], node)


def _groups(p: ModelView, c: ModelView, added: list[str], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Added nodes grouped by the morph that made them, each with the receipt step that names it."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for name in added:
        origin = morph_origin(name, p) or MorphOrigin("unattributed", "", None)
        group = groups.setdefault((origin.kind, origin.scope), {
            "morph": origin.kind, "scope": origin.scope, "origin": origin.node, "step": None, "nodes": []})
        group["nodes"].append(name)
    claimed: set[int] = set()
    for group in groups.values():
        # A step names its layer by node or output tensor; a morph of a node made by an earlier step
        # names a tensor that the group's own nodes now produce.
        names = {group["scope"]} | {t for n in group["nodes"] for t in c.nodes[n].outputs}
        if group["origin"] is not None and group["scope"] in (group["origin"], *p.nodes[group["origin"]].outputs):
            names |= {group["origin"], *p.nodes[group["origin"]].outputs}
        for k, step in enumerate(steps):
            params = step.get("params", {})
            if k not in claimed and step.get("pass") == group["morph"] and \
                    any(isinstance(v, str) and v in names for v in params.values()):
                group["step"] = {"index": k + 1, "pass": step.get("pass"), "params": params}
                claimed.add(k)
                break
    return list(groups.values())


def _new_history(p: ModelView, c: ModelView, parent_path: Any) -> tuple[list[dict[str, Any]], str]:
    """The receipt records the child has beyond the parent's, and a note when they do not fit the parent."""
    if not c.history:
        return [], "the child has no onnxmorph receipt"
    if c.history[:len(p.history)] != p.history:
        return list(c.history), "the child's receipt does not continue the parent's: showing all of it"
    new = c.history[len(p.history):]
    if not new:
        return [], "the child's receipt records nothing beyond the parent's"
    if parent_path is not None:
        recorded = new[0].get("parent_sha256")
        if recorded and recorded != _file_sha256(Path(parent_path)):
            return new, f"the receipt names another parent (sha256 {recorded[:16]}...), not this file"
    return new, ""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- Model Explorer


def model_explorer_mapping(d: Diff) -> dict[str, Any]:
    """Model Explorer's sync-navigation data for the split pane: parent (left) node ids -> child (right) ids.

    Model Explorer's ONNX adapter uses node names as node ids. `mappingEntries` (one parent node
    to the several nodes a morph made of it) supersedes `mapping`, which older versions read and
    which holds one counterpart each.
    """
    entries = [{"leftNodeIds": [left], "rightNodeIds": right} for left, right in d.mapping.items() if right]
    return {
        "mappingEntries": entries,
        "mapping": {e["leftNodeIds"][0]: e["rightNodeIds"][0] for e in entries},
        "showDiffHighlights": True,
    }

