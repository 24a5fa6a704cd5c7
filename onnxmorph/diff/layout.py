"""A layered (Sugiyama-style) layout of a small DAG for the diff page: iterative, no recursion, no library.

Longest-path layering (a node with no inputs drawn goes just above its first consumer, not to the
top), dummy points on edges that span several layers, a few barycentre sweeps to reduce
crossings, then x positions pulled toward the neighbours' mean: each row is placed as near those
means as its order and spacing allow (isotonic regression, so rows do not drift apart and the
drawing stays as narrow as its widest row needs). The drawn region of a diff is a few dozen to a
few hundred boxes, so this runs in milliseconds in Python and the page needs no layout code (or
network) at view time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NODE_W, NODE_H = 168.0, 38.0
DUMMY_W = 14.0
GAP_X, GAP_Y = 22.0, 34.0
MARGIN = 16.0


@dataclass
class Layout:
    """Box centres, edge polylines and the drawing's size."""

    centres: dict[str, tuple[float, float]] = field(default_factory=dict)
    edges: list[tuple[str, str, list[tuple[float, float]]]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def layered_layout(order: Sequence[str], edges: Sequence[tuple[str, str]], sweeps: int = 8) -> Layout:
    """Lay out `order` (items in topological order) with `edges` (u before v in `order`) top to bottom.

    An edge that points backwards in `order` is laid out as if reversed, so any input terminates.
    """
    index = {name: k for k, name in enumerate(order)}
    forward = sorted({(u, v) if index[u] < index[v] else (v, u) for u, v in edges if u != v},
                     key=lambda e: (index[e[0]], index[e[1]]))
    layer = {name: 0 for name in order}
    preds: dict[str, list[str]] = {name: [] for name in order}
    for u, v in forward:
        preds[v].append(u)
    succs: dict[str, list[str]] = {name: [] for name in order}
    for u, v in forward:
        succs[u].append(v)
    for name in order:  # topological order: every predecessor's layer is final when it is read
        for u in preds[name]:
            layer[name] = max(layer[name], layer[u] + 1)
    # A source (a node reading only weights or graph inputs, an unchanged run whose inputs are not
    # drawn) sits just above its first consumer: on the top row it would widen the drawing and
    # draw long edges down to where it is used.
    for name in reversed(order):
        if not preds[name] and succs[name]:
            layer[name] = min(layer[v] for v in succs[name]) - 1
    # Edges spanning several layers get a dummy point per layer crossed, so ordering sees them.
    up: dict[str, list[str]] = {name: [] for name in order}
    down: dict[str, list[str]] = {name: [] for name in order}
    chains: list[tuple[str, str, list[str]]] = []
    rank = dict(index)
    for k, (u, v) in enumerate(forward):
        chain = [u]
        for level in range(layer[u] + 1, layer[v]):
            dummy = f"\0{k}:{level}"
            layer[dummy], rank[dummy] = level, index[u]
            up[dummy], down[dummy] = [], []
            chain.append(dummy)
        chain.append(v)
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
        chains.append((u, v, chain[1:-1]))
    layers: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for name in sorted(layer, key=lambda n: rank[n]):
        layers[layer[name]].append(name)
    _order_layers(layers, up, down, sweeps)
    xs = _place_x(layers, up, down)
    out = Layout()
    for level, names in enumerate(layers):
        y = MARGIN + level * (NODE_H + GAP_Y) + NODE_H / 2
        for name in names:
            out.centres[name] = (xs[name], y)
    for u, v, dummies in chains:
        (ux, uy), (vx, vy) = out.centres[u], out.centres[v]
        points = [(ux, uy + NODE_H / 2)] + [out.centres[d] for d in dummies] + [(vx, vy - NODE_H / 2)]
        out.edges.append((u, v, points))
    for name in [n for n in out.centres if n.startswith("\0")]:
        del out.centres[name]
    out.width = max((x + NODE_W / 2 for x, _ in out.centres.values()), default=0.0) + MARGIN
    out.height = MARGIN * 2 + len(layers) * (NODE_H + GAP_Y) - GAP_Y
    return out


def _width(name: str) -> float:
    return DUMMY_W if name.startswith("\0") else NODE_W


def _order_layers(layers: list[list[str]], up: dict[str, list[str]], down: dict[str, list[str]],
                  sweeps: int) -> None:
    """Barycentre heuristic: sort each layer by the mean position of its neighbours, down then up."""
    for sweep in range(sweeps):
        downward = sweep % 2 == 0
        levels = range(1, len(layers)) if downward else range(len(layers) - 2, -1, -1)
        for level in levels:
            fixed = layers[level - 1] if downward else layers[level + 1]
            position = {name: k for k, name in enumerate(fixed)}
            neighbours = up if downward else down
            current = layers[level]
            keys = {}
            for k, name in enumerate(current):
                seen = [position[n] for n in neighbours[name] if n in position]
                keys[name] = sum(seen) / len(seen) if seen else float(k)
            current.sort(key=lambda n: keys[n])


def _place_x(layers: list[list[str]], up: dict[str, list[str]], down: dict[str, list[str]],
             sweeps: int = 8) -> dict[str, float]:
    """x of every item: packed per layer, then pulled toward its neighbours' mean without overlapping."""
    xs: dict[str, float] = {}
    for names in layers:
        x = MARGIN
        for name in names:
            xs[name] = x + _width(name) / 2
            x += _width(name) + GAP_X
    for sweep in range(sweeps):
        # Down then up with one side's neighbours, then both sides: long edges (chains of dummies)
        # straighten and every row settles between the rows around it.
        both = sweep >= sweeps - 2
        downward = sweep % 2 == 0
        for names in layers if downward else reversed(layers):
            wanted = []
            for name in names:
                seen = [xs[n] for n in (up[name] + down[name] if both else up[name] if downward else down[name])]
                wanted.append(sum(seen) / len(seen) if seen else xs[name])
            _pack(names, wanted, xs)
    low = min((xs[n] - _width(n) / 2 for names in layers for n in names), default=MARGIN)
    return {name: x - low + MARGIN for name, x in xs.items()}


def _pack(names: list[str], wanted: list[float], xs: dict[str, float]) -> None:
    """Place `names` in order, no two closer than their spacing, as near `wanted` as possible (least squares).

    With offsets o_k (the least distance from the first item), y_k = x_k - o_k must not decrease:
    an isotonic regression of wanted_k - o_k, which pool-adjacent-violators solves in one pass.
    """
    offsets = [0.0]
    for a, b in zip(names, names[1:]):
        offsets.append(offsets[-1] + (_width(a) + _width(b)) / 2 + GAP_X)
    blocks: list[list[float]] = []  # [sum, count] of runs of items that sit at their least spacing
    for w, o in zip(wanted, offsets):
        blocks.append([w - o, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    k = 0
    for total, count in blocks:
        for _ in range(int(count)):
            xs[names[k]] = total / count + offsets[k]
            k += 1
