"""`diff --html`: one self-contained page drawing the changed region of parent and child side by side.

Everything is inline (SVG, CSS, a little script; nothing is fetched). The layout is computed here
(onnxmorph.diff.layout), so the browser only paints boxes; the untouched rest of each graph is
collapsed into "N unchanged nodes" boxes, which keeps a ResNet-50 or a 12-block transformer page
small. Nodes carry their change as a CSS class and a `data-change` attribute.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxmorph.diff.compare import Diff, ModelView, diff, model_explorer_mapping
from onnxmorph.diff.layout import NODE_H, NODE_W, Layout, layered_layout
from onnxmorph.diff.text import scope_bundles, shape_text, step_text, summary_rows
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
    bundles: dict[str, list[str]] = field(default_factory=dict)  # box -> the added nodes it stands for


def write_diff_page(parent: PathLike, child: PathLike, out: PathLike) -> Path:
    """Compare the two model files and write the page to `out` (atomically)."""
    return write_page(diff(parent, child), out)


def write_page(d: Diff, out: PathLike) -> Path:
    """Write `render(d)` to `out`: a temporary file beside it, renamed over it when complete."""
    return write_text(out, render(d))


def write_outputs(d: Diff, *, html: PathLike | None = None, model_explorer: PathLike | None = None) -> None:
    """The files `onnxmorph diff` writes: the page and Model Explorer's node mapping, each when asked."""
    if html:
        write_page(d, html)
    if model_explorer:
        write_text(model_explorer, json.dumps(model_explorer_mapping(d), indent=1) + "\n")


def write_text(out: PathLike, text: str) -> Path:
    """Write `text` to `out` atomically (onnxmorph.io.loading's temporary file and rename), readable as usual."""
    return saving.write_atomically(out, text.encode("utf-8"))


def render(d: Diff) -> str:
    """The whole page as one string."""
    panes = [_pane(d, "parent"), _pane(d, "child")]
    data = {pane.side: _details(d, pane) for pane in panes}
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
    return Pane(side, view, tags, collapsed, layered_layout(order, edges), [n for n in view.nodes if n in drawn],
                truncated, bundles)


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
    parts = [f"<svg class=\"graph\" data-side=\"{pane.side}\" width=\"{layout.width:.0f}\" "
             f"height=\"{layout.height:.0f}\" viewBox=\"0 0 {layout.width:.0f} {layout.height:.0f}\" "
             "xmlns=\"http://www.w3.org/2000/svg\"><defs><marker id=\"arrow-" + pane.side + "\" viewBox=\"0 0 8 8\" "
             "refX=\"7\" refY=\"4\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">"
             "<path d=\"M0,0 L8,4 L0,8 z\" fill=\"#8a8f98\"/></marker></defs>"]
    for _, _, points in layout.edges:
        path = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f"<path class=\"edge\" d=\"{path}\" marker-end=\"url(#arrow-{pane.side})\"/>")
    for name, (x, y) in layout.centres.items():
        parts.append(_box(pane, name, x - NODE_W / 2, y - NODE_H / 2))
    parts.append("</svg>")
    return (f"<section class=\"pane\" id=\"{pane.side}-pane\"><h2>{pane.side}: {_e(pane.view.path)}</h2>"
            f"<p class=\"note\">{_e(note)}</p><div class=\"scroll\">{''.join(parts)}</div></section>")


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
        return (f"<g class=\"node collapsed\" data-collapsed=\"{count}\" transform=\"translate({x:.1f},{y:.1f})\">"
                f"<title>{count} unchanged node(s), collapsed</title>"
                f"<rect width=\"{NODE_W:.0f}\" height=\"{NODE_H:.0f}\" rx=\"10\"/>"
                f"<text x=\"{NODE_W / 2:.0f}\" y=\"24\" class=\"op\">\u22ef {count} unchanged</text></g>")
    node = pane.view.nodes[name]
    tags = pane.tags.get(name, [])
    change = tags[0] if tags else "context"
    label = name if len(name) <= _LABEL_CHARS else "\u2026" + name[-(_LABEL_CHARS - 1):]
    badge = " \u25b2" if "grown" in tags else ""
    return (f"<g class=\"node {' '.join(tags) or 'context'}\" data-node=\"{_e(name)}\" data-change=\"{change}\" "
            f"data-op=\"{_e(node.op)}\" transform=\"translate({x:.1f},{y:.1f})\" tabindex=\"0\">"
            f"<title>{_e(name)} ({_e(node.op)}){': ' + ', '.join(tags) if tags else ''}</title>"
            f"<rect width=\"{NODE_W:.0f}\" height=\"{NODE_H:.0f}\" rx=\"4\"/>"
            f"<text x=\"{NODE_W / 2:.0f}\" y=\"16\" class=\"op\">{_e(node.op)}{badge}</text>"
            f"<text x=\"{NODE_W / 2:.0f}\" y=\"31\" class=\"name\">{_e(label)}</text></g>")


# --------------------------------------------------------------------------- node details and header


def _details(d: Diff, pane: Pane) -> dict[str, Any]:
    """What the details panel shows for each drawn node, and its counterparts on the other side."""
    view = pane.view
    if pane.side == "parent":
        peers = d.mapping
    else:
        peers = {}
        for left, rights in d.mapping.items():
            for right in rights:
                peers.setdefault(right, []).append(left)
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
            "inputs": [[t, shape_text(view.shapes.get(t))] for t in view.data_inputs(node)],
            "outputs": [[t, shape_text(view.shapes.get(t))] for t in node.outputs],
            "peers": peers.get(name, []),
        }
    return out


def _header_html(d: Diff, title: str) -> str:
    rows = "".join(f"<tr><th>{_e(what)}</th><td>{_e(old)}</td><td>{_e(new)}</td><td>{_e(change)}</td></tr>"
                   for what, old, new, change in summary_rows(d))
    parts = [f"<h1>{_e(title)}</h1>",
             "<table class=\"summary\"><tr><th></th><th>parent</th><th>child</th><th>change</th></tr>"
             f"{rows}</table>", _history_html(d), _LEGEND]
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


_LEGEND = (
    "<p class=\"legend\"><span class=\"key added\">added</span><span class=\"key removed\">removed</span>"
    "<span class=\"key grown\">weights changed shape \u25b2</span><span class=\"key modified\">attributes "
    "changed</span><span class=\"key rewired\">rewired</span><span class=\"key context\">unchanged "
    "neighbour</span><span class=\"key collapsed\">unchanged, collapsed</span></p>"
)

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fafbfc}
header{padding:12px 18px;background:#fff;border-bottom:1px solid #d0d7de}
h1{font-size:18px;margin:0 0 8px}h2{font-size:14px;margin:0 0 2px;word-break:break-all}
h3{font-size:13px;margin:8px 0 4px}svg.graph{display:block;margin:0 auto}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #d0d7de;padding:2px 8px;text-align:left}
th{background:#f3f4f6}.steps{margin:2px 0 4px;padding-left:22px}
.pass{color:#1a7f37}.fail{color:#cf222e}.warn{color:#9a6700}
.panes{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr) 320px;gap:10px;padding:10px}
.pane{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px;min-width:0}
.note{color:#57606a;margin:0 0 6px}.scroll{overflow:auto;max-height:72vh}
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
.legend .key{display:inline-block;margin-right:8px;padding:1px 6px;border:1px solid #8a8f98;border-radius:3px}
.key.added{background:#dafbe1;border-color:#1a7f37}.key.removed{background:#ffebe9;border-color:#cf222e}
.key.grown{background:#fff1e5;border-color:#bc4c00}.key.modified{background:#fbefff;border-color:#8250df}
.key.rewired{background:#ddf4ff;border-color:#0969da}.key.collapsed{background:#f3f4f6;border-style:dashed}
#details{position:sticky;top:10px;align-self:start;max-height:90vh;overflow:auto;background:#fff;
border:1px solid #d0d7de;border-radius:6px;padding:8px 10px}
#details h4{margin:0 0 4px;word-break:break-all}#details td{font-size:12px;word-break:break-all}
.hint{color:#57606a;margin:0}
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('diff-data').textContent);
  var panel = document.getElementById('details');
  var nodes = {parent: new Map(), child: new Map()};
  var pinned = null;
  document.querySelectorAll('svg.graph').forEach(function (svg) {
    var side = svg.dataset.side;
    svg.querySelectorAll('g.node[data-node]').forEach(function (g) { nodes[side].set(g.dataset.node, g); });
    svg.addEventListener('mouseover', function (e) {
      var g = e.target.closest('g.node[data-node]');
      if (g && !pinned) show(side, g);
    });
    svg.addEventListener('click', function (e) {
      var g = e.target.closest('g.node[data-node]');
      if (pinned) pinned.classList.remove('pinned');
      pinned = g && g !== pinned ? g : null;
      if (pinned) { pinned.classList.add('pinned'); show(side, pinned); }
    });
  });
  function add(parent, tag, text) {
    var el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  }
  function table(rows) {
    var t = document.createElement('table');
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
      })));
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
  // A link to `page.html#child:NAME` (or #parent:NAME, URL-encoded) opens with that node selected.
  var wanted = /^#(parent|child):(.+)$/.exec(location.hash);
  if (wanted) {
    var target = nodes[wanted[1]].get(decodeURIComponent(wanted[2]));
    if (target) { pinned = target; target.classList.add('pinned'); show(wanted[1], target); }
  }
  window.addEventListener('load', function () {
    document.body.dataset.renderMs = performance.now().toFixed(1);
  });
})();
"""
