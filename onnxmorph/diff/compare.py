"""`diff`: what a morph changed between a parent and a child model, read from their headers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxmorph.diff.text import format_diff
from onnxmorph.diff.views import MORPH_SCOPE, ModelView, Source, flop_count, model_view, parameter_count

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
                # the input sizes the FLOPs are counted at ({} where counted at declared or symbolic sizes)
                "flops_input_sizes": [self.parent.flop_inputs, self.child.flop_inputs],
                "flops_notes": [self.parent.flop_note, self.child.flop_note],
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
        return format_diff(self)


_TAG_ORDER = ["added", "removed", "grown", "modified", "rewired"]


def diff(parent: Source, child: Source, shapes: Mapping[str, Sequence[int]] | None = None) -> Diff:
    """Compare two models (paths, read from their headers, or ModelProtos).

    FLOPs are counted at `shapes` ({input: dims}, as `verify` takes them) and, for the dynamic
    axes left open, verification's defaults (a batch of 1 per example, a sequence of 16).
    """
    p, c = model_view(parent, shapes), model_view(child, shapes)
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
    matches = list(MORPH_SCOPE.finditer(name))
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
    # A step may name its target otherwise (`block --after 0`: an index): one group and one step of
    # a morph left unmatched belong together.
    for morph in {g["morph"] for g in groups.values() if g["step"] is None}:
        lone = [g for g in groups.values() if g["morph"] == morph and g["step"] is None]
        left = [k for k, step in enumerate(steps) if k not in claimed and step.get("pass") == morph]
        if len(lone) == 1 and len(left) == 1:
            k = left[0]
            lone[0]["step"] = {"index": k + 1, "pass": morph, "params": steps[k].get("params", {})}
            claimed.add(k)
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

