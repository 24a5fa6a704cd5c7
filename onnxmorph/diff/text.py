"""The text form of `onnxmorph diff`: counts before and after, the receipt, and every change."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from onnxmorph.diff.shapes import describe_sizes
from onnxmorph.diff.views import MORPH_SCOPE, Dims, flop_count, parameter_count
from onnxmorph.verification.feeds import DEFAULT_SEQUENCE

if TYPE_CHECKING:  # compare imports this module for Diff.__str__
    from onnxmorph.diff.compare import Diff


def format_diff(d: Diff) -> str:
    """What changed from parent to child, as `onnxmorph diff` prints it."""
    p, c = d.parent, d.child
    lines = [f"diff {p.path} -> {c.path}"]
    lines += _summary(d)
    lines += format_history(d.history, d.receipt_note)
    lines += _added(d)
    if d.removed:
        lines.append(f"removed nodes ({len(d.removed)}):")
        for name in d.removed:
            became = d.mapping.get(name) or []
            tail = f"  (became {len(became)} node(s): {', '.join(became[:4])}{', ...' if len(became) > 4 else ''})"
            lines.append(f"  - {name}  {p.nodes[name].op}" + (tail if became else ""))
    if d.rewired:
        lines.append(f"rewired nodes ({len(d.rewired)}):")
        for entry in d.rewired:
            for key in ("inputs", "outputs"):
                if key in entry:
                    old, new = entry[key]
                    lines.append(f"  ~ {entry['node']}  {key} {', '.join(old) or '-'} -> {', '.join(new) or '-'}")
    if d.modified:
        lines.append(f"changed attributes ({len(d.modified)}):")
        for entry in d.modified:
            ops = "" if entry["op"][0] == entry["op"][1] else f"  op {entry['op'][0]} -> {entry['op'][1]}"
            attrs = "; ".join(f"{k} {_unset(v[0])} -> {_unset(v[1])}" for k, v in entry["attributes"].items())
            lines.append(f"  ~ {entry['node']}{ops}  {attrs}".rstrip())
    if d.weights:
        lines.append(f"weights whose shape changed ({len(d.weights)}):")
        for w in d.weights:
            was = f" (was {w['old_name']})" if w.get("old_name") else ""
            lines.append(f"  {w['name']}{was}  {shape_text(w['old'])} -> {shape_text(w['new'])}"
                         f"  (read by {', '.join(w['nodes']) or 'nothing'})")
    if not (d.added or d.removed or d.rewired or d.modified or d.weights):
        lines.append("no structural change (same nodes, wiring, attributes and weight shapes)")
    if p.unnamed_nodes:
        lines.append(f"note: {p.unnamed_nodes} parent node(s) have no name in the file; they are shown under the "
                     "names onnxmorph gives them when it loads the model (their first output)")
    return "\n".join(lines)


def shape_text(dims: Dims | list[Any] | None) -> str:
    """`64x3x7x7`, `?` per unknown axis, `scalar` for rank 0."""
    if dims is None:
        return "?"
    return "x".join("?" if x is None else str(x) for x in dims) or "scalar"


def count_text(n: float) -> str:
    """A count in engineering units: 1.23 M, 4.56 G (up to E: a long sequence squared)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g}"


def _change(old: float, new: float) -> str:
    delta = new - old
    rel = f", {delta / old:+.1%}" if old else ""
    return f"{'+' if delta >= 0 else '-'}{count_text(abs(delta))}{rel}"


def summary_rows(d: Diff) -> list[tuple[str, str, str, str]]:
    """(what, parent, child, change) for nodes, parameters and FLOPs; shared by the text and the page."""
    (pf, pu), (cf, cu) = flop_count(d.parent), flop_count(d.child)
    pp, cp = parameter_count(d.parent), parameter_count(d.child)
    rows = [
        ("nodes", str(len(d.parent.nodes)), str(len(d.child.nodes)),
         f"{len(d.added)} added, {len(d.removed)} removed, {len(d.rewired)} rewired, {len(d.modified)} modified"),
        ("parameters", f"{pp:,}", f"{cp:,}", _change(pp, cp)),
    ]
    flops = ("FLOPs per example", count_text(pf) + (" + ?" if pu else ""), count_text(cf) + (" + ?" if cu else ""),
             _change(pf, cf) if not (pu or cu) else "not comparable: some shapes unknown")
    rows.append(flops)
    return rows


def _summary(d: Diff) -> list[str]:
    rows = summary_rows(d)
    width = max(len(r[0]) for r in rows)
    lines = [f"  {what.ljust(width)}  {old} -> {new}  ({change})" for what, old, new, change in rows]
    lines.append(f"  (FLOPs of Conv, ConvTranspose, Gemm and MatMul, a multiply-add counted as 2, {flop_basis(d)})")
    for side, view in (("parent", d.parent), ("child", d.child)):
        _, unknown = flop_count(view)
        if unknown:
            more = ", ..." if len(unknown) > 5 else ""
            lines.append(f"  {side}: FLOPs unknown for {len(unknown)} node(s) whose shapes are not fully known: "
                         f"{', '.join(unknown[:5])}{more}")
        for note in (view.shape_note, view.flop_note if unknown or not view.flop_inputs else ""):
            if note:
                lines.append(f"  {side}: {note}")
    return lines


def flop_basis(d: Diff) -> str:
    """At which input sizes the FLOPs are counted, for the text and the page."""
    sizes = [d.parent.flop_inputs, d.child.flop_inputs]
    if not any(sizes):
        symbolic = d.parent.flop_shapes is None and bool(d.parent.batch_dims or d.child.batch_dims)
        return "from inferred shapes, a symbolic batch as 1" if symbolic else "at the inputs' declared sizes"
    at = describe_sizes(sizes[1] or sizes[0]) if sizes[0] == sizes[1] or not all(sizes) else \
        f"{describe_sizes(sizes[0])} (parent), {describe_sizes(sizes[1])} (child)"
    how = "a dynamic batch counted as 1, per example"
    if d.parent.flop_sequence or d.child.flop_sequence:
        how += f"; other dynamic axes as verify sizes them: by --shape NAME:DIMS, else a sequence of {DEFAULT_SEQUENCE}"
    return f"at input sizes {at} ({how})"


def format_history(history: list[dict[str, Any]], note: str = "") -> list[str]:
    """The receipt's morph runs with their verification tables."""
    lines = [f"receipt: {len(history)} morph run(s) since the parent" + (f" ({note})" if note else "")]
    for k, record in enumerate(history, 1):
        steps = [step_text(s) for s in record.get("steps", [])]
        ver = record.get("verification")
        check = "not verified" if not ver else (
            f"verification {'PASS' if ver.get('passed') else 'FAIL'} "
            f"({ver.get('trials')} trial(s), seed {ver.get('seed')}, inputs {ver.get('inputs')})")
        if len(steps) == 1:
            lines.append(f"  run {k}: {steps[0]}; {check}")
        else:
            lines.append(f"  run {k} ({len(steps)} steps): {check}")
            lines += [f"    step {j}: {text}" for j, text in enumerate(steps, 1)]
        if not ver:
            continue
        rows = [("output", "max abs err", "max rel err", "atol", "rtol")]
        rows += [(o.get("name", "?"), _num(o.get("max_abs_error")), _num(o.get("max_rel_error")),
                  _num(o.get("atol")), _num(o.get("rtol"))) for o in ver.get("outputs", [])]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["    " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def step_text(step: dict[str, Any]) -> str:
    """`deepen(layer='conv2', kernel=3)`: a receipt step with the parameters that were set."""
    params = ", ".join(f"{k}={v!r}" for k, v in step.get("params", {}).items() if v is not None)
    return f"{step.get('pass', '?')}({params})"


def _unset(value: str | None) -> str:
    return "(unset)" if value is None else value


def _num(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else str(value)


def _added(d: Diff) -> list[str]:
    if not d.added:
        return []
    lines = [f"added nodes ({len(d.added)}), by the morph that made them:"]
    for group in d.groups:
        step = f" (receipt step {group['step']['index']})" if group["step"] else " (no receipt step names it)"
        where = group["scope"] or "?"
        if group["origin"] and group["origin"] != where:
            where += f" (parent node {group['origin']})"
        head = "not made by a morph (no /morph_ in their names)" if group["morph"] == "unattributed" else \
            f"{group['morph']} of {where}{step}"
        lines.append(f"  {head}:")
        bundles = scope_bundles(group["nodes"])
        bundled = {m for members in bundles.values() for m in members}
        for name in group["nodes"]:
            if name in bundled:
                key = next(k for k, members in bundles.items() if name in members)
                if bundles[key][0] == name:
                    lines.append(_bundle_line(d, key, bundles[key]))
                continue
            node = d.child.nodes[name]
            weights = ", ".join(f"{shape_text(dims)}" for _, _, dims in d.child.node_weights(node))
            lines.append(f"    + {name}  {node.op}" + (f"  weights {weights}" if weights else ""))
    return lines


def scope_bundles(names: list[str], least: int = 10) -> dict[str, list[str]]:
    """Names grouped by the scope one level under their morph's (`X/morph_moe/expert_3`), groups of `least` or more,
    where one morph made two or more such groups: the copies of a sublayer (an upcycled FFN's experts).

    A morph that makes one copy (a new block) keeps its nodes listed one by one.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        matches = list(MORPH_SCOPE.finditer(name))
        rest = name[matches[-1].end():].strip("/") if matches else ""
        if "/" in rest:
            groups.setdefault(name[:matches[-1].end()] + "/" + rest.split("/")[0], []).append(name)
    big = {k: v for k, v in groups.items() if len(v) >= least}
    per_morph = Counter(k.rsplit("/", 1)[0] for k in big)
    return {k: v for k, v in big.items() if per_morph[k.rsplit("/", 1)[0]] >= 2}


def _bundle_line(d: Diff, scope: str, members: list[str]) -> str:
    layers, others = [], Counter()
    for name in members:
        node = d.child.nodes[name]
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and d.child.node_weights(node):
            weights = ", ".join(shape_text(dims) for _, _, dims in d.child.node_weights(node))
            layers.append(f"{node.op} {weights}")
        else:
            others[node.op] += 1
    rest = ", ".join(f"{op} {n}" for op, n in others.most_common())
    return (f"    + {scope}/...  {len(members)} nodes: " + "; ".join(layers)
            + (f"; and {sum(others.values())} others ({rest})" if others else ""))
