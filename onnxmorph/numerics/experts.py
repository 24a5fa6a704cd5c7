"""Dense-to-MoE upcycling, pure numpy: which expert layouts are exact, their routing, shards and compensated rescaling.

An FFN `f(x) = W_down h(x)` (h the hidden units: `act(W_up x)` or, gated, `act(W_gate x) * (W_up x)`)
becomes `y = sum over groups g of  c_g * sum_{e in TopK_g(r(x))} w_e(x) f_e(x)`. The experts of a group
are copies of one shard of f (the whole of f when there is one shard); see `plan_layout` for what
makes the sum equal f for every x, and `rescale_units` for the only perturbation of an expert that
keeps it equal to its shard (the hidden units' scaling symmetry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ROUTINGS", "ROUTERS", "SHARED", "Group", "Layout", "plan_layout", "shard_ranges", "unit_scales",
           "rescale_units", "router_weights", "gates", "mixture", "ffn_multiples"]

# topk-softmax: softmax over the k chosen logits (Mixtral's top-k renormalised: the chosen weights sum to 1);
# softmax-topk: softmax over all of a group's logits, the top k kept as they are (Switch, Qwen1.5-MoE).
ROUTINGS = ("topk-softmax", "softmax-topk")
ROUTERS = ("random", "zero")
SHARED = ("none", "copy", "random")


@dataclass(frozen=True)
class Group:
    """Experts routed together: `top_k` of them chosen per token, their weights times `scale`."""

    experts: tuple[int, ...]  # indices of the experts, in router order
    shard: int | None  # the shard every expert of the group is a copy of; None: expert e is shard e
    top_k: int
    scale: float


@dataclass(frozen=True)
class Layout:
    """How E experts are made from the FFN and routed; `reason` says why the mixture equals the FFN."""

    experts: int
    shards: int
    top_k: int
    routing: str
    router: str  # the router's start: "random" or "zero"
    groups: tuple[Group, ...]
    reason: str

    @property
    def copies(self) -> int:
        """Experts per shard."""
        return self.experts // self.shards

    def shard_of(self, expert: int) -> int:
        """The shard of the FFN that expert `expert` computes."""
        return expert // self.copies

    def copy_of(self, expert: int) -> int:
        """Which copy of its shard `expert` is (copy 0 keeps the parent's weights)."""
        return expert % self.copies

    @property
    def active(self) -> int:
        """Experts evaluated per token by top-k routing (the dense graph evaluates all `experts`)."""
        return sum(g.top_k for g in self.groups)


def plan_layout(experts: int, top_k: int, shards: int = 1, routing: str = "topk-softmax",
                router: str | None = None, hidden: int | None = None) -> Layout:
    """The layout of `experts` experts made from `shards` shards of an FFN with `hidden` units, or ValueError why not.

    Exact layouts (y = f(x) for every x):

    * one shard (every expert a copy of f), topk-softmax: the k chosen weights sum to 1 whatever the
      router, so `sum w_e f(x) = f(x)`: any router, default random. Not with k = 1: the one weight is 1
      whatever the logits, so the router would get no gradient (refused; softmax-topk trains it).
    * one shard, softmax-topk: the chosen weights are softmax probabilities summing to less than 1; with
      a zero router each is 1/E, so scaling the gates by E/k makes them sum to 1: zero router only.
    * S shards with C = E/S >= 2 copies each: one routing group per shard (top-k of its C copies, k <= C),
      so every shard's chosen copies carry weight 1 in all and the groups add up to f. topk-softmax: any
      router; softmax-topk: zero router, gates times C/k.
    * S = E shards, one expert each (fine-grained): f is the sum of ALL shards, so every shard must be
      active (k = E) with weight 1: weights E * softmax(logits) from a zero router (both routings agree when
      k = E). With k < E the unchosen shards' share of f is missing for every token: refused.
    """
    for name, value in (("experts", experts), ("top_k", top_k), ("shards", shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
    if router is not None and router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, not {router!r}")
    if experts < 2:
        raise ValueError("an MoE needs at least 2 experts")
    if experts % shards:
        raise ValueError(f"{experts} experts cannot be split evenly among {shards} shards (experts must be a "
                         "multiple of shards)")
    if hidden is not None and hidden % shards:
        raise ValueError(f"the FFN's {hidden} hidden units cannot be split into {shards} equal shards")
    copies = experts // shards
    if copies == 1:
        if top_k != experts:
            raise ValueError(
                f"with every expert its own shard of the FFN, the FFN is the sum of all {experts} shards: top-{top_k} "
                f"leaves the unchosen shards' share out for every token; exact only with --top-k {experts} (all "
                f"active, weights {experts} x softmax from a zero router), or with copies of each shard (experts a "
                "multiple of 2 x shards)")
        if router == "random":
            raise ValueError(f"with every expert its own shard, all active, each shard's weight {experts} x "
                             f"softmax(logits) is 1 only when the logits are equal: the router must start at zero")
        group = Group(tuple(range(experts)), None, top_k, float(experts))
        reason = (f"the FFN is the sum of its {experts} shards; all are active and a zero router gives each the "
                  f"weight {experts} x 1/{experts} = 1")
        return Layout(experts, shards, top_k, routing, "zero", (group,), reason)
    if top_k > copies:
        per = f" of each shard's {copies} copies" if shards > 1 else ""
        raise ValueError(f"top-k {top_k} is more than the {copies} experts to choose from{per}")
    if routing == "topk-softmax":
        if top_k == 1:
            raise ValueError(
                "topk-softmax with top-1: a softmax over the one chosen logit is 1 whatever the router, so the mixture "
                "is exact but the router never gets a gradient and never learns; use --routing softmax-topk (Switch: "
                "the chosen expert's probability over all, from a zero router) or top-k >= 2")
        scale = 1.0
        chosen = router or "random"
        reason = (f"the {top_k} chosen weights of a group are a softmax over the chosen logits and sum to 1 whatever "
                  "the router; every expert of a group computes the same shard")
    else:
        if router == "random":
            raise ValueError(f"softmax-topk keeps softmax probabilities over all {copies} experts of a group, which "
                             f"sum to 1 over the chosen {top_k} only for equal logits: the router must start at zero")
        chosen, scale = "zero", copies / top_k
        reason = (f"a zero router gives every expert the probability 1/{copies}; the gates are scaled by "
                  f"{copies}/{top_k} so that the {top_k} chosen ones sum to 1")
    if shards > 1:
        reason += f"; each of the {shards} shard groups adds its shard, and the shards add up to the FFN"
    groups = tuple(Group(tuple(range(s * copies, (s + 1) * copies)), s, top_k, scale) for s in range(shards))
    return Layout(experts, shards, top_k, routing, chosen, groups, reason)


def shard_ranges(hidden: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `shards` equal, contiguous runs of `hidden` units."""
    if shards < 1 or hidden % shards:
        raise ValueError(f"{hidden} hidden units cannot be split into {shards} equal shards")
    size = hidden // shards
    return [(s * size, (s + 1) * size) for s in range(shards)]


def unit_scales(rng: np.random.Generator, units: int, noise: float) -> np.ndarray:
    """Positive factors exp(noise * z), z ~ N(0, 1), one per hidden unit (all 1 when `noise` is 0).

    Positive, so that they pass through a positively homogeneous activation (relu(s z) = s relu(z)).
    """
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if noise == 0:
        return np.ones(units)
    return np.exp(noise * rng.standard_normal(units))


def rescale_units(rows: np.ndarray, row_axis: int, columns: np.ndarray, column_axis: int,
                  scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit j's incoming weights (`rows` along `row_axis`) times s_j, its outgoing ones (`columns`) divided by s_j.

    Exact when the hidden unit is positively homogeneous of degree 1 in those incoming weights: the
    up projection of a gated FFN (`act(gate) * up`: up enters linearly), or the only projection of
    an FFN whose activation is relu-like. Returns new float64 arrays; the inputs are not changed.
    """
    if np.any(scales <= 0) or not np.all(np.isfinite(scales)):
        raise ValueError("unit scales must be finite and positive")
    shape_rows = [1] * rows.ndim
    shape_rows[row_axis] = -1
    shape_cols = [1] * columns.ndim
    shape_cols[column_axis] = -1
    return (np.asarray(rows, np.float64) * scales.reshape(shape_rows),
            np.asarray(columns, np.float64) / scales.reshape(shape_cols))


def router_weights(rng: np.random.Generator, inputs: int, experts: int, std: float, start: str) -> np.ndarray:
    """A router's [inputs, experts] weight: N(0, std) entries ("random") or zeros ("zero")."""
    if start == "zero":
        return np.zeros((inputs, experts))
    return rng.normal(0.0, std, (inputs, experts))


# --------------------------------------------------------------------------- reference routing (for tests)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gates(logits: np.ndarray, layout: Layout) -> np.ndarray:
    """[..., E] weights of the experts for router `logits` [..., E] (zero for the experts not chosen)."""
    out = np.zeros_like(logits, dtype=np.float64)
    for group in layout.groups:
        z = np.asarray(logits[..., list(group.experts)], np.float64)
        # ONNX TopK: on ties the lower index comes first (a stable sort of the negated values)
        order = np.argsort(-z, axis=-1, kind="stable")[..., :group.top_k]
        chosen = np.take_along_axis(z, order, axis=-1)
        if layout.routing == "topk-softmax":
            weights = _softmax(chosen)
        else:
            weights = np.take_along_axis(_softmax(z), order, axis=-1)
        part = np.zeros_like(z)
        np.put_along_axis(part, order, weights * group.scale, axis=-1)
        out[..., list(group.experts)] = part
    return out


def mixture(x: np.ndarray, router: np.ndarray, experts: list, layout: Layout) -> np.ndarray:
    """The MoE output for inputs `x` [..., D]: every expert evaluated (dense), weighted by `gates`, summed."""
    weights = gates(x @ router, layout)
    return sum(weights[..., e:e + 1] * expert(x) for e, expert in enumerate(experts))


def ffn_multiples(layout: Layout) -> tuple[float, float]:
    """(active, dense): the experts' FLOPs per token as multiples of the parent FFN's (router not counted).

    An expert is 1/shards of the FFN; top-k routing needs the `layout.active` chosen ones, the dense
    graph evaluates all `layout.experts`.
    """
    return layout.active / layout.shards, layout.experts / layout.shards
