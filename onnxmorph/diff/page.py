"""`diff --html`: one self-contained page drawing the changed region of parent and child side by side.

Everything is inline (SVG, CSS, a little script; nothing is fetched). The layout is computed here
(onnxmorph.diff.layout), so the browser only paints boxes; the untouched rest of each graph is
collapsed into "N unchanged nodes" boxes, which keeps a ResNet-50 or a 12-block transformer page
small. Nodes carry their change as a CSS class and a `data-change` attribute.

The page fills the window: the header on top, the two panes below, each scrolling its own
drawing. On load the script zooms each drawing to its pane's width (not below a readable scale,
worked out from the changed region: see `_SCRIPT`) and scrolls each pane to its first change
(`data-first` on the pane's SVG: the topmost changed node). `#child:NAME` / `#parent:NAME`
selects that node and scrolls both panes to it and its counterpart; so does a click.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxmorph.diff.compare import Diff, ModelView, diff, model_explorer_mapping
from onnxmorph.diff.layout import NODE_H, NODE_W, Layout, layered_layout
from onnxmorph.diff.text import flop_basis, scope_bundles, shape_text, step_text, summary_rows
from onnxmorph.diff.views import flop_count
from onnxmorph.io import saving
from onnxmorph.io.loading import PathLike

# More drawn nodes than this per side and only the changed ones are drawn (then only the first ones).
MAX_DRAWN = 400
# Added nodes one level under a morph's scope (`X/morph_moe/expert_3/...`) are drawn as one box when
# there are at least this many: an upcycled FFN's experts are whole copies, one box each.
BUNDLE_MIN = 10
_LABEL_CHARS = 25


@dataclass
class Pane:
    """One side of the page: the items drawn (nodes and collapsed runs) and their layout."""

    side: str
    view: ModelView
    tags: dict[str, list[str]]
    collapsed: dict[str, int]
    layout: Layout
    drawn: list[str]
    truncated: str  # why fewer nodes are drawn than the changed region and its neighbours, if so
    focus: list[str]  # the changed nodes drawn on this side (where the page opens), topmost first
    bundles: dict[str, list[str]] = field(default_factory=dict)  # box -> the added nodes it stands for


def write_diff_page(parent: PathLike, child: PathLike, out: PathLike,
                    shapes: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Compare the two model files and write the page to `out` (atomically); FLOPs at `shapes` (see `diff`)."""
    return write_page(diff(parent, child, shapes), out)


def write_page(d: Diff, out: PathLike) -> Path:
    """Write `render(d)` to `out`: a temporary file beside it, renamed over it when complete."""
    return write_text(out, render(d))


def write_outputs(d: Diff, *, html: PathLike | None = None, model_explorer: PathLike | None = None) -> None:
    """The files `onnxmorph diff` writes: the page and Model Explorer's node mapping, each when asked.

    Both are made first and written as one: when the second cannot be written (a full disk), the
    first is taken back (the file it replaced restored), so a failed command leaves neither.
    """
    texts = [(html, render(d) if html else ""),
             (model_explorer, json.dumps(model_explorer_mapping(d), indent=1) + "\n" if model_explorer else "")]
    with contextlib.ExitStack() as written:
        for target, text in texts:
            if target:
                written.enter_context(saving.restored_on_failure(saving.check_output_path(target)))
                write_text(target, text)


def write_text(out: PathLike, text: str) -> Path:
    """Write `text` to `out` atomically (onnxmorph.io.loading's temporary file and rename), readable as usual."""
    return saving.write_atomically(out, text.encode("utf-8"))


def render(d: Diff) -> str:
    """The whole page as one string."""
    panes = [_pane(d, "parent"), _pane(d, "child")]
    data = {pane.side: _details(d, pane, other) for pane, other in zip(panes, reversed(panes))}
    title = f"onnxmorph diff: {Path(d.parent.path).name} \u2192 {Path(d.child.path).name}"
    body = "".join(_pane_html(pane) for pane in panes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header>{_header_html(d, title)}</header>"
        f"<main class=\"panes\">{body}"
        "<aside id=\"details\"><p class=\"hint\">Hover over a node to see its op, attributes and weights; "
        "click to keep it (or open the page at #child:NAME).</p></aside></main>"
        f"<script type=\"application/json\" id=\"diff-data\">{_json_for_script(data)}</script>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# --------------------------------------------------------------------------- the drawn region


def _pane(d: Diff, side: str) -> Pane:
    view = d.parent if side == "parent" else d.child
    tags = d.changes(side)
    # What changed on either side is drawn on both, where the node exists, with its neighbours.
    changed = set(tags) | {n for n in d.changes("child" if side == "parent" else "parent") if n in view.nodes}
    drawn = changed | _neighbours(view, changed)
    truncated = ""
    if len(drawn) > MAX_DRAWN:
        drawn, truncated = changed, f"more than {MAX_DRAWN} nodes to draw: neighbours left out"
    if len(drawn) > MAX_DRAWN:
        drawn = set([n for n in view.nodes if n in changed][:MAX_DRAWN])
        truncated = f"more than {MAX_DRAWN} changed nodes: only the first {MAX_DRAWN} are drawn"
    bundles = _bundles(view, [n for n in view.nodes if "added" in tags.get(n, ())])
    order, edges, collapsed = _items(view, drawn, bundles)
    layout = layered_layout(order, edges)
    # Where the page opens: this side's changes, else the other side's changes drawn here (the node
    # a removed one fed), else whatever is drawn; topmost first, then leftmost.
    focus = [n for n in layout.centres if n in tags] or [n for n in layout.centres if n in changed] or \
        [n for n in layout.centres if n not in collapsed]
    focus.sort(key=lambda n: (layout.centres[n][1], layout.centres[n][0]))
    return Pane(side, view, tags, collapsed, layout, [n for n in view.nodes if n in drawn], truncated, focus, bundles)


def _bundles(view: ModelView, added: list[str]) -> dict[str, list[str]]:
    """Added nodes grouped by the scope one level under their morph's (`X/morph_moe/expert_3`), for groups of at
    least BUNDLE_MIN nodes that no path leaves and re-enters (so that one box keeps the drawing acyclic)."""
    return {key: members for key, members in scope_bundles(added, BUNDLE_MIN).items()
            if _convex(view, set(members))}


def _convex(view: ModelView, members: set[str]) -> bool:
    """Whether no path from `members` to `members` passes outside them."""
    stack = [c for m in members for t in view.nodes[m].outputs for c in view.consumers.get(t, []) if c not in members]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for t in view.nodes[name].outputs:
            for c in view.consumers.get(t, []):
                if c in members:
                    return False
                stack.append(c)
    return True


def _neighbours(view: ModelView, names: set[str]) -> set[str]:
    """The nodes one edge away from `names` (producers of their inputs, consumers of their outputs)."""
    out = set()
    for name in names:
        node = view.nodes[name]
        out.update(view.producer[t] for t in view.data_inputs(node) if t in view.producer)
        for t in node.outputs:
            out.update(view.consumers.get(t, []))
    return out - names


def _items(view: ModelView, drawn: set[str], bundles: dict[str, list[str]] | None = None
           ) -> tuple[list[str], list[tuple[str, str]], dict[str, int]]:
    """Drawn nodes, one box per bundle and one per run of undrawn nodes (in graph order), with the edges between.

    Runs are contiguous in topological order, so an edge between two items always points forward:
    collapsing keeps the picture acyclic; bundles are convex, and the items are sorted again.
    """
    order: list[str] = []
    item_of: dict[str, str] = {}
    collapsed: dict[str, int] = {}
    bundle_of = {m: key for key, members in (bundles or {}).items() for m in members}
    for name in view.nodes:
        if name in bundle_of:
            if bundle_of[name] not in item_of.values():
                order.append(bundle_of[name])
            item_of[name] = bundle_of[name]
            continue
        if name in drawn:
            order.append(name)
        elif not order or order[-1] not in collapsed:
            order.append(f"\u22ef{len(collapsed)}")
            collapsed[order[-1]] = 1
        else:
            collapsed[order[-1]] += 1
        item_of[name] = order[-1]
    edges = set()
    for name, node in view.nodes.items():
        for t in view.data_inputs(node):
            source = view.producer.get(t)
            if source is not None and item_of[source] != item_of[name]:
                edges.add((item_of[source], item_of[name]))
    if bundle_of:
        order = _topological(order, edges)
    return order, sorted(edges), collapsed


def _topological(order: list[str], edges: set[tuple[str, str]]) -> list[str]:
    """`order` sorted so that every edge points forward, keeping the given order where it does (Kahn, stable)."""
    import heapq

    rank = {name: k for k, name in enumerate(order)}
    indegree = dict.fromkeys(order, 0)
    after: dict[str, list[str]] = {name: [] for name in order}
    for u, v in edges:
        after[u].append(v)
        indegree[v] += 1
    ready = [rank[n] for n in order if indegree[n] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        name = order[heapq.heappop(ready)]
        out.append(name)
        for v in after[name]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, rank[v])
    return out if len(out) == len(order) else order


# --------------------------------------------------------------------------- SVG


def _pane_html(pane: Pane) -> str:
    shown = len(pane.drawn)
    total = len(pane.view.nodes)
    note = f"showing {shown} of {total} nodes; {total - shown} unchanged collapsed"
    if pane.truncated:
        note += f"; {pane.truncated}"
    layout = pane.layout
    first = f" data-first=\"{_e(pane.focus[0])}\"" if pane.focus else ""
    boxes = [layout.centres[n] for n in pane.focus]
    region = (min(x for x, _ in boxes) - NODE_W / 2, min(y for _, y in boxes) - NODE_H / 2,
              max(x for x, _ in boxes) + NODE_W / 2, max(y for _, y in boxes) + NODE_H / 2) if boxes else \
        (0.0, 0.0, layout.width, layout.height)
    parts = [f"<svg class=\"graph\" data-side=\"{pane.side}\"{first} "
             f"data-focus=\"{' '.join(f'{v:.0f}' for v in region)}\" width=\"{layout.width:.0f}\" "
             f"height=\"{layout.height:.0f}\" viewBox=\"0 0 {layout.width:.0f} {layout.height:.0f}\" "
             "xmlns=\"http://www.w3.org/2000/svg\"><defs><marker id=\"arrow-" + pane.side + "\" viewBox=\"0 0 8 8\" "
             "refX=\"7\" refY=\"4\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">"
             "<path d=\"M0,0 L8,4 L0,8 z\" fill=\"#8a8f98\"/></marker></defs>"]
    for _, _, points in layout.edges:
        parts.append(f"<path class=\"edge\" d=\"{_path(points)}\" marker-end=\"url(#arrow-{pane.side})\"/>")
    for name, (x, y) in layout.centres.items():
        parts.append(_box(pane, name, x - NODE_W / 2, y - NODE_H / 2))
    parts.append("</svg>")
    zoom = ("<span class=\"zoom\"><button type=\"button\" data-zoom=\"out\" title=\"zoom out (or Ctrl+wheel)\">"
            "\u2212</button><output>100%</output><button type=\"button\" data-zoom=\"in\" title=\"zoom in\">+</button>"
            "<button type=\"button\" data-zoom=\"fit\" title=\"fit the width and go back to the first change\">"
            "fit</button></span>")
    return (f"<section class=\"pane\" id=\"{pane.side}-pane\"><div class=\"bar\"><h2>{pane.side}: "
            f"{_e(pane.view.path)}</h2>{zoom}</div><p class=\"note\">{_e(note)}</p>"
            f"<div class=\"scroll\">{''.join(parts)}</div></section>")


def _path(points: list[tuple[float, float]]) -> str:
    """An SVG path through `points` in whole pixels, without the points that lie on a straight run."""
    kept = [points[0]]
    for k in range(1, len(points) - 1):
        (ax, ay), (bx, by), (cx, cy) = kept[-1], points[k], points[k + 1]
        if abs((bx - ax) * (cy - ay) - (by - ay) * (cx - ax)) > 0.5 * math.hypot(cx - ax, cy - ay):
            kept.append(points[k])  # more than half a pixel off the line from the last kept point
    kept.append(points[-1])
    return "M" + " L".join(f"{x:.0f},{y:.0f}" for x, y in kept)


def _box(pane: Pane, name: str, x: float, y: float) -> str:
    if name in pane.bundles:
        members = pane.bundles[name]
        layers = [m for m in members if pane.view.nodes[m].op in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
        scope = name.rsplit("/", 1)[-1]
        title = f"{name}: {len(members)} added nodes" + (f", layers {', '.join(layers)}" if layers else "")
        return (f"<g class=\"node added bundle\" data-bundle=\"{_e(name)}\" data-count=\"{len(members)}\" "
                f"transform=\"translate({x:.1f},{y:.1f})\"><title>{_e(title)}</title>"
                f"<rect width=\"{NODE_W:.0f}\" height=\"{NODE_H:.0f}\" rx=\"10\"/>"
                f"<text x=\"{NODE_W / 2:.0f}\" y=\"16\" class=\"op\">{_e(scope)}</text>"
                f"<text x=\"{NODE_W / 2:.0f}\" y=\"31\" class=\"name\">{len(members)} added nodes, "
                f"{len(layers)} layers</text></g>")
    if name in pane.collapsed:
        count = pane.collapsed[name]
        return (f"<g class=\"node collapsed\" data-collapsed=\"{count}\" transform=\"translate({x:.0f},{y:.0f})\">"
                f"<title>{count} unchanged node(s), collapsed</title>"
                f"<rect width=\"{NODE_W:.0f}\" height=\"{NODE_H:.0f}\" rx=\"10\"/>"
                f"<text x=\"{NODE_W / 2:.0f}\" y=\"24\" class=\"op\">\u22ef {count} unchanged</text></g>")
    node = pane.view.nodes[name]
    tags = pane.tags.get(name, [])
    change = tags[0] if tags else "context"
    label = name if len(name) <= _LABEL_CHARS else "\u2026" + name[-(_LABEL_CHARS - 1):]
    badge = " \u25b2" if "grown" in tags else ""
    # No <title> tooltip: hovering shows the whole name and more in the details panel.
    return (f"<g class=\"node {' '.join(tags) or 'context'}\" data-node=\"{_e(name)}\" data-change=\"{change}\" "
            f"data-op=\"{_e(node.op)}\" transform=\"translate({x:.0f},{y:.0f})\" tabindex=\"0\">"
            f"<rect width=\"{NODE_W:.0f}\" height=\"{NODE_H:.0f}\" rx=\"4\"/>"
            f"<text x=\"{NODE_W / 2:.0f}\" y=\"16\" class=\"op\">{_e(node.op)}{badge}</text>"
            f"<text x=\"{NODE_W / 2:.0f}\" y=\"31\" class=\"name\">{_e(label)}</text></g>")


# --------------------------------------------------------------------------- node details and header


def _details(d: Diff, pane: Pane, other: Pane) -> dict[str, Any]:
    """What the details panel shows for each drawn node, and its counterparts on the other side.

    A node without a counterpart (a node a morph made without replacing one) gets `near`: the
    counterpart of the nearest node that has one drawn, where the other pane scrolls on a click.
    """
    view = pane.view
    if pane.side == "parent":
        peers = d.mapping
    else:
        peers = {}
        for left, rights in d.mapping.items():
            for right in rights:
                peers.setdefault(right, []).append(left)
    shown = set(other.drawn)
    near = _nearest(view, {n: p[0] for n in pane.drawn for p in [[q for q in peers.get(n, []) if q in shown]] if p})
    old_dims = {w["name"]: w["old"] for w in d.weights}
    out = {}
    for name in pane.drawn:
        node = view.nodes[name]
        weights = []
        for k, weight, dims in view.node_weights(node):
            entry = [k, weight, shape_text(dims)]
            if pane.side == "child" and weight in old_dims:
                entry.append(shape_text(old_dims[weight]))
            weights.append(entry)
        out[name] = {
            "op": node.op, "change": pane.tags.get(name, []), "attrs": node.attrs, "weights": weights,
            "inputs": [[t, _tensor_shape(view, t)] for t in view.data_inputs(node)],
            "outputs": [[t, _tensor_shape(view, t)] for t in node.outputs],
            "peers": peers.get(name, []),
        }
        if name in near and not any(q in shown for q in out[name]["peers"]):
            out[name]["near"] = near[name]
    return out


def _tensor_shape(view: ModelView, name: str) -> str:
    """`batchxsequencex64`, and the sizes FLOPs are counted at when they say more: `?x?x64 (1x16x64)`.

    Sizes onnx's inference names itself (`unk__12`) are shown as `?`: the name says nothing.
    """
    dims = view.shapes.get(name)
    shown = None if dims is None else tuple(None if isinstance(d, str) and d.startswith("unk__") else d
                                            for d in dims)
    text = shape_text(shown)
    at = view.flop_shapes.get(name) if view.flop_shapes is not None else None
    if at is not None and all(isinstance(d, int) for d in at) and tuple(at) != shown:
        text += f" ({shape_text(at)})"
    return text


def _nearest(view: ModelView, anchors: dict[str, str]) -> dict[str, str]:
    """{node: the value of the anchor nearest to it}, nearest by edges either way (one breadth-first search)."""
    found = dict(anchors)
    frontier = list(anchors)
    while frontier:
        following = []
        for name in frontier:
            node = view.nodes[name]
            around = [view.producer[t] for t in view.data_inputs(node) if t in view.producer]
            around += [c for t in node.outputs for c in view.consumers.get(t, [])]
            for other in around:
                if other not in found:
                    found[other] = found[name]
                    following.append(other)
        frontier = following
    return found


def _header_html(d: Diff, title: str) -> str:
    rows = "".join(f"<tr><th>{_e(what)}</th><td>{_e(old)}</td><td>{_e(new)}</td><td>{_e(change)}</td></tr>"
                   for what, old, new, change in summary_rows(d))
    notes = [f"{side}: {view.flop_note}" for side, view in (("parent", d.parent), ("child", d.child))
             if view.flop_note and (flop_count(view)[1] or not view.flop_inputs)]
    basis = f"FLOPs of Conv, ConvTranspose, Gemm and MatMul {flop_basis(d)}" + "".join(f"; {n}" for n in notes)
    parts = [f"<h1>{_e(title)}</h1><div class=\"top\"><div>"
             "<table class=\"summary\"><tr><th></th><th>parent</th><th>child</th><th>change</th></tr>"
             f"{rows}</table><p class=\"basis\">{_e(basis).replace('--shape NAME:DIMS', _FLAG)}</p></div>"
             f"{_history_html(d)}</div>", _LEGEND]
    if d.weights:
        shown = d.weights[:40]
        items = "".join(f"<li data-weight=\"{_e(w['name'])}\"><code>{_e(w['name'])}</code> "
                        f"{_e(shape_text(w['old']))} \u2192 {_e(shape_text(w['new']))}</li>" for w in shown)
        more = f"<li>and {len(d.weights) - len(shown)} more</li>" if len(d.weights) > len(shown) else ""
        parts.append(f"<details class=\"weights\"><summary>{len(d.weights)} weight(s) changed shape</summary>"
                     f"<ul>{items}{more}</ul></details>")
    return "".join(parts)


def _history_html(d: Diff) -> str:
    note = f" <span class=\"warn\">({_e(d.receipt_note)})</span>" if d.receipt_note else ""
    parts = [f"<div class=\"receipt\"><h3>receipt: {len(d.history)} morph run(s){note}</h3>"]
    for k, record in enumerate(d.history, 1):
        steps = [step_text(s) for s in record.get("steps", [])]
        ver = record.get("verification")
        verdict = ("PASS" if ver.get("passed") else "FAIL") if ver else "not verified"
        check = f"verification <b class=\"{verdict.lower()}\">{verdict}</b>" if ver else verdict
        if ver:
            check += (f" ({_e(ver.get('trials'))} trial(s), seed {_e(ver.get('seed'))}, "
                      f"inputs {_e(ver.get('inputs'))})")
        listed = "".join(f"<li><code>{_e(text)}</code></li>" for text in steps)
        parts.append(f"<p>run {k}: {check}</p><ol class=\"steps\">{listed}</ol>")
        if not ver:
            continue
        rows = "".join(
            f"<tr><td>{_e(o.get('name'))}</td><td>{_num(o.get('max_abs_error'))}</td>"
            f"<td>{_num(o.get('max_rel_error'))}</td><td>{_num(o.get('atol'))}</td><td>{_num(o.get('rtol'))}</td></tr>"
            for o in ver.get("outputs", []))
        parts.append("<table class=\"verification\"><tr><th>output</th><th>max abs err</th><th>max rel err</th>"
                     f"<th>atol</th><th>rtol</th></tr>{rows}</table>")
    parts.append("</div>")
    return "".join(parts)


def _num(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else _e(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a model's names must not end the element.
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_FLAG = "<code>--shape NAME:DIMS</code>"
_LEGEND = (
    "<p class=\"legend\"><span class=\"key added\">added</span><span class=\"key removed\">removed</span>"
    "<span class=\"key grown\">weights changed shape \u25b2</span><span class=\"key modified\">attributes "
    "changed</span><span class=\"key rewired\">rewired</span><span class=\"key context\">unchanged "
    "neighbour</span><span class=\"key collapsed\">unchanged, collapsed</span></p>"
)

_CSS = """
html,body{height:100%}
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fafbfc;
display:flex;flex-direction:column;overflow:hidden}
header{flex:none;max-height:40vh;overflow:auto;padding:8px 18px;background:#fff;border-bottom:1px solid #d0d7de}
h1{font-size:17px;margin:0 0 6px}h2{font-size:14px;margin:0;word-break:break-all;flex:1;min-width:0}
h3{font-size:13px;margin:0 0 4px}svg.graph{display:block;margin:0 auto}
.top{display:flex;flex-wrap:wrap;gap:6px 28px;align-items:flex-start}.top>div{min-width:0}
.top .receipt{flex:1 1 460px}.basis{color:#57606a;margin:2px 0 0;max-width:620px;font-size:12px}
.basis code{white-space:nowrap}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #d0d7de;padding:2px 8px;text-align:left}
th{background:#f3f4f6}.steps{margin:2px 0 4px;padding-left:22px}.receipt p{margin:0}
.pass{color:#1a7f37}.fail{color:#cf222e}.warn{color:#9a6700}
.panes{flex:1;min-height:0;display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr) 320px;
grid-template-rows:minmax(0,1fr);gap:10px;padding:10px}
.pane{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px;min-width:0;min-height:0;
display:flex;flex-direction:column}
.bar{display:flex;align-items:center;gap:8px}.zoom{flex:none;white-space:nowrap}
.zoom button{font:inherit;min-width:26px;padding:0 6px;margin-left:2px;background:#f6f8fa;border:1px solid #d0d7de;
border-radius:4px;cursor:pointer}.zoom output{display:inline-block;min-width:42px;text-align:right;color:#57606a}
.note{color:#57606a;margin:0 0 6px}.scroll{flex:1;min-height:0;overflow:auto;border-top:1px solid #eaeef2}
.edge{fill:none;stroke:#8a8f98;stroke-width:1.3}
.node rect{fill:#fff;stroke:#8a8f98;stroke-width:1.2}.node{cursor:pointer}
.node text{text-anchor:middle;font-size:11px;fill:#1f2328}.node .op{font-weight:600}.node .name{fill:#57606a}
.node.collapsed rect{fill:#f3f4f6;stroke-dasharray:4 3}.node.collapsed{cursor:default}
.node.added rect{fill:#dafbe1;stroke:#1a7f37;stroke-width:2}.node.bundle rect{stroke-width:3.5}
.node.removed rect{fill:#ffebe9;stroke:#cf222e;stroke-width:2}
.node.grown rect{fill:#fff1e5;stroke:#bc4c00;stroke-width:2}
.node.modified rect{fill:#fbefff;stroke:#8250df;stroke-width:2}
.node.rewired rect{fill:#ddf4ff;stroke:#0969da;stroke-width:2}
.node.peer rect{stroke:#ff00be;stroke-width:3}.node.pinned rect{stroke:#000;stroke-width:3}
.legend{margin:6px 0 0}.legend .key{display:inline-block;margin-right:8px;padding:0 6px;border:1px solid #8a8f98;
border-radius:3px}
.key.added{background:#dafbe1;border-color:#1a7f37}.key.removed{background:#ffebe9;border-color:#cf222e}
.key.grown{background:#fff1e5;border-color:#bc4c00}.key.modified{background:#fbefff;border-color:#8250df}
.key.rewired{background:#ddf4ff;border-color:#0969da}.key.collapsed{background:#f3f4f6;border-style:dashed}
#details{min-height:0;overflow:auto;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px 10px}
#details h4{margin:0 0 4px;word-break:break-all}#details td{font-size:12px;word-break:break-all}
#details table.weights td:first-child{white-space:nowrap;word-break:normal}
.hint{color:#57606a;margin:0}
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('diff-data').textContent);
  var panel = document.getElementById('details');
  var nodes = {parent: new Map(), child: new Map()};
  var panes = {};
  var pinned = null;
  // Zoom: drawings are fitted to their pane's width, but not below READABLE (11 px labels at 7.7 px)
  // unless the changed region alone fits at a smaller scale; never enlarged on load.
  var READABLE = 0.7, LEAST = 0.05, MOST = 3;
  document.querySelectorAll('svg.graph').forEach(function (svg) {
    var side = svg.dataset.side;
    var pane = panes[side] = {
      side: side, svg: svg, box: svg.parentNode, scale: 1,
      w: +svg.getAttribute('width'), h: +svg.getAttribute('height'),
      focus: (svg.dataset.focus || '').split(' ').map(Number),
      label: document.querySelector('#' + side + '-pane .zoom output')
    };
    svg.querySelectorAll('g.node[data-node]').forEach(function (g) { nodes[side].set(g.dataset.node, g); });
    svg.addEventListener('mouseover', function (e) {
      var g = e.target.closest('g.node[data-node]');
      if (g && !pinned) show(side, g);
    });
    svg.addEventListener('click', function (e) { choose(side, e.target.closest('g.node[data-node]')); });
    svg.addEventListener('keydown', function (e) {
      var g = e.target.closest('g.node[data-node]');
      if (g && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); choose(side, g); }
    });
    pane.box.addEventListener('wheel', function (e) {
      if (!e.ctrlKey && !e.metaKey) return;
      e.preventDefault();
      var b = pane.box.getBoundingClientRect();
      zoom(pane, pane.scale * Math.exp(-e.deltaY * 0.0015), e.clientX - b.left, e.clientY - b.top);
    }, {passive: false});
    document.querySelectorAll('#' + side + '-pane [data-zoom]').forEach(function (button) {
      button.addEventListener('click', function () {
        var how = button.dataset.zoom;
        if (how === 'fit') fit(pane); else zoom(pane, pane.scale * (how === 'in' ? 1.25 : 0.8));
      });
    });
  });
  // Drawing coordinates (SVG user units) under a point of a pane, given in px from the pane's corner.
  function at(pane, px, py) {
    var r = pane.svg.getBoundingClientRect(), b = pane.box.getBoundingClientRect();
    return {x: (b.left + pane.box.clientLeft + px - r.left) / pane.scale,
            y: (b.top + pane.box.clientTop + py - r.top) / pane.scale};
  }
  // Scroll a pane so that drawing point (x, y) lies under pane point (px, py).
  function put(pane, x, y, px, py) {
    var r = pane.svg.getBoundingClientRect(), b = pane.box.getBoundingClientRect();
    pane.box.scrollLeft += r.left + x * pane.scale - (b.left + pane.box.clientLeft + px);
    pane.box.scrollTop += r.top + y * pane.scale - (b.top + pane.box.clientTop + py);
  }
  function zoom(pane, scale, px, py) {
    if (px === undefined) { px = pane.box.clientWidth / 2; py = pane.box.clientHeight / 2; }
    var fixed = at(pane, px, py);
    pane.scale = Math.min(MOST, Math.max(LEAST, scale));
    pane.svg.setAttribute('width', (pane.w * pane.scale).toFixed(1));
    pane.svg.setAttribute('height', (pane.h * pane.scale).toFixed(1));
    if (pane.label) pane.label.textContent = Math.round(pane.scale * 100) + '%';
    put(pane, fixed.x, fixed.y, px, py);
  }
  // The whole width when it is readable, else the changed region's; then the first change in view:
  // down, a little below the top, under a row of context; across, the changes in those rows centred,
  // as far as the first change stays in view.
  function fit(pane) {
    var room = pane.box.clientWidth, f = pane.focus;
    var scale = Math.min(1, (room - 8) / pane.w);
    if (scale < READABLE) scale = Math.max(READABLE, Math.min(1, (room - 8) / Math.max(1, f[2] - f[0])));
    zoom(pane, scale);
    var first = nodes[pane.side].get(pane.svg.dataset.first);
    if (!first) { put(pane, (f[0] + f[2]) / 2, f[1], room / 2, 0); return; }
    var c = centre(first), half = first.getBBox().height / 2, above = Math.min(110, pane.box.clientHeight / 4);
    var bottom = c.y - half + (pane.box.clientHeight - above) / pane.scale, low = c.x, high = c.x;
    nodes[pane.side].forEach(function (g) {
      if (g.dataset.change === 'context') return;
      var p = centre(g);
      if (p.y >= c.y && p.y + half <= bottom) { low = Math.min(low, p.x); high = Math.max(high, p.x); }
    });
    var slack = Math.max(0, (room / pane.scale - first.getBBox().width) / 2 - 4);
    var x = Math.min(c.x + slack, Math.max(c.x - slack, (low + high) / 2));
    put(pane, x, c.y - half, room / 2, above);
  }
  function centre(g) {
    var box = g.getBBox(), m = g.transform.baseVal.consolidate().matrix;
    return {x: m.e + box.x + box.width / 2, y: m.f + box.y + box.height / 2};
  }
  // Scroll a node's pane to centre it, unless it is in view already (or always, when asked).
  function reveal(side, g, always) {
    var pane = panes[side], box = pane.box, r = g.getBoundingClientRect(), b = box.getBoundingClientRect();
    var left = b.left + box.clientLeft, top = b.top + box.clientTop;
    var inside = r.left >= left && r.right <= left + box.clientWidth && r.top >= top &&
      r.bottom <= top + box.clientHeight;
    if (inside && !always) return;
    var c = centre(g);
    put(pane, c.x, c.y, box.clientWidth / 2, box.clientHeight / 2);
  }
  // The other pane follows: to the node's counterpart, or where the nearest node with one sits.
  function follow(side, name) {
    var info = data[side][name], other = side === 'parent' ? 'child' : 'parent';
    var names = (info.peers || []).concat(info.near ? [info.near] : []);
    for (var k = 0; k < names.length; k++) {
      var el = nodes[other].get(names[k]);
      if (el) { reveal(other, el, false); return; }
    }
  }
  function choose(side, g) {
    if (pinned) pinned.classList.remove('pinned');
    pinned = g && g !== pinned ? g : null;
    if (!pinned) return;
    pinned.classList.add('pinned');
    show(side, pinned);
    follow(side, pinned.dataset.node);
    var hash = '#' + side + ':' + encodeURIComponent(pinned.dataset.node);
    try { history.replaceState(null, '', hash); } catch (e) { /* the address just keeps the old name */ }
  }
  function add(parent, tag, text) {
    var el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  }
  function table(rows, kind) {
    var t = document.createElement('table');
    if (kind) t.className = kind;
    rows.forEach(function (r) { var tr = add(t, 'tr'); r.forEach(function (c) { add(tr, 'td', c); }); });
    return t;
  }
  function show(side, g) {
    var info = data[side][g.dataset.node];
    if (!info) return;
    panel.textContent = '';
    add(panel, 'h4', side + ': ' + g.dataset.node);
    var change = info.change.length ? info.change.join(', ') : 'unchanged';
    add(panel, 'div', 'op ' + info.op + ' \\u2014 ' + change);
    var attrs = Object.keys(info.attrs).map(function (k) { return [k, info.attrs[k]]; });
    if (attrs.length) { add(panel, 'b', 'attributes'); panel.appendChild(table(attrs)); }
    if (info.weights.length) {
      add(panel, 'b', 'weights');
      panel.appendChild(table(info.weights.map(function (w) {
        return ['input ' + w[0], w[1], w.length > 3 ? w[3] + ' \\u2192 ' + w[2] : w[2]];
      }), 'weights'));
    }
    add(panel, 'b', 'inputs');
    panel.appendChild(table(info.inputs));
    add(panel, 'b', 'outputs');
    panel.appendChild(table(info.outputs));
    if (info.peers.length) add(panel, 'div', (side === 'parent' ? 'became: ' : 'from: ') + info.peers.join(', '));
    document.querySelectorAll('g.node.peer').forEach(function (el) { el.classList.remove('peer'); });
    var other = side === 'parent' ? 'child' : 'parent';
    info.peers.forEach(function (name) { var el = nodes[other].get(name); if (el) el.classList.add('peer'); });
  }
  // A link to `page.html#child:NAME` (or #parent:NAME, URL-encoded) opens with that node selected
  // and scrolled into view, its counterpart too.
  function fromHash() {
    var wanted = /^#(parent|child):(.+)$/.exec(location.hash);
    if (!wanted) return;
    var side = wanted[1], name;
    try { name = decodeURIComponent(wanted[2]); } catch (e) { name = wanted[2]; }
    var target = nodes[side].get(name);
    if (pinned) pinned.classList.remove('pinned');
    pinned = target || null;
    if (!target) {
      panel.textContent = '';
      add(panel, 'h4', side + ': ' + name);
      add(panel, 'div', 'not drawn: no node of this name, or an unchanged one away from the change (collapsed)');
      return;
    }
    target.classList.add('pinned');
    show(side, target);
    reveal(side, target, true);
    follow(side, name);
  }
  Object.keys(panes).forEach(function (side) { fit(panes[side]); });
  fromHash();
  window.addEventListener('hashchange', fromHash);
  window.addEventListener('load', function () {
    document.body.dataset.renderMs = performance.now().toFixed(1);
  });
})();
"""
