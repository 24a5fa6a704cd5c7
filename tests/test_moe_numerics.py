"""Upcycling numerics (onnxmorph.numerics.experts) without ONNX: which expert layouts equal the FFN, which do not."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmorph.numerics import experts as ne

D, H = 6, 8


def _gelu(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


class FFN:
    """f(x) = act(x @ gate) * (x @ up) @ down + b (gated) or act(x @ up + c) @ down + b."""

    def __init__(self, rng: np.random.Generator, gated: bool, act=_gelu) -> None:
        self.gated, self.act = gated, act
        self.up, self.gate = rng.normal(size=(D, H)), rng.normal(size=(D, H))
        self.c, self.down, self.b = rng.normal(size=H), rng.normal(size=(H, D)), rng.normal(size=D)

    def __call__(self, x: np.ndarray, units: slice = slice(None), up=None, down=None, c=None, b=None):
        up = self.up[:, units] if up is None else up
        down = self.down[units] if down is None else down
        c = self.c[units] if c is None else c
        b = self.b if b is None else b
        hidden = self.act(x @ self.gate[:, units]) * (x @ up) if self.gated else self.act(x @ up + c)
        return hidden @ down + b


def _experts(f: FFN, layout: ne.Layout, rng: np.random.Generator, noise: float = 0.0) -> list:
    """The experts of `layout` as functions: shards of f (bias shared out among the shards), copies rescaled."""
    ranges = ne.shard_ranges(H, layout.shards)
    experts = []
    for e in range(layout.experts):
        a, z = ranges[layout.shard_of(e)]
        up, down, c = f.up[:, a:z], f.down[a:z], f.c[a:z]
        if noise and layout.copy_of(e) > 0:
            scales = ne.unit_scales(rng, z - a, noise)
            up, down = ne.rescale_units(up, 1, down, 0, scales)
            c = c * scales
        experts.append(lambda x, a=a, z=z, up=up, down=down, c=c: f(x, slice(a, z), up, down, c, f.b / layout.shards))
    return experts


EXACT = [  # (experts, top_k, shards, routing)
    (2, 1, 1, "softmax-topk"), (4, 2, 1, "topk-softmax"), (8, 2, 1, "topk-softmax"), (4, 4, 1, "topk-softmax"),
    (4, 2, 1, "softmax-topk"), (8, 3, 1, "softmax-topk"), (4, 1, 2, "softmax-topk"), (8, 2, 2, "topk-softmax"),
    (8, 1, 4, "softmax-topk"), (4, 4, 4, "topk-softmax"), (8, 8, 8, "softmax-topk"),
]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("experts,top_k,shards,routing", EXACT)
def test_every_accepted_layout_computes_the_ffn_whatever_the_router(experts, top_k, shards, routing, gated) -> None:
    rng = np.random.default_rng(experts * 100 + top_k * 10 + shards)
    f = FFN(rng, gated)
    layout = ne.plan_layout(experts, top_k, shards, routing, hidden=H)
    x = rng.normal(size=(64, D))
    router = ne.router_weights(rng, D, experts, 1.0, layout.router)  # a strong router: routing varies a lot
    y = ne.mixture(x, router, _experts(f, layout, rng), layout)
    np.testing.assert_allclose(y, f(x), rtol=1e-10, atol=1e-10)
    chosen = (ne.gates(x @ router, layout) > 0).sum(-1)
    assert (chosen == layout.active).all()  # top-k: exactly the active experts carry weight, per token
    if layout.router == "random" and layout.active < layout.experts:
        picks = {tuple(np.flatnonzero(g)) for g in ne.gates(x @ router, layout)}
        assert len(picks) > 1  # the router does choose: different tokens, different experts


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("gated,act", [(True, _silu), (True, _gelu), (False, lambda z: np.maximum(z, 0))])
def test_rescaled_copies_stay_exact_where_the_unit_is_linear_or_relu_like(gated, act, shards) -> None:
    rng = np.random.default_rng(3)
    f = FFN(rng, gated, act)
    layout = ne.plan_layout(4 * shards, 2, shards, hidden=H)
    experts = _experts(f, layout, rng, noise=0.5)
    x = rng.normal(size=(32, D))
    router = ne.router_weights(rng, D, layout.experts, 1.0, "random")
    np.testing.assert_allclose(ne.mixture(x, router, experts, layout), f(x), rtol=1e-10, atol=1e-10)
    # and the copies are not the same parameters: each expert alone still equals its shard
    a, z = ne.shard_ranges(H, shards)[0]
    np.testing.assert_allclose(experts[1](x), f(x, slice(a, z), b=f.b / shards), rtol=1e-10, atol=1e-10)


def test_rescaling_a_gelu_ffn_changes_it_which_is_why_the_morph_refuses_noise_there() -> None:
    rng = np.random.default_rng(4)
    f = FFN(rng, gated=False, act=_gelu)
    up, down = ne.rescale_units(f.up, 1, f.down, 0, ne.unit_scales(rng, H, 0.5))
    x = rng.normal(size=(32, D))
    assert np.abs(f(x, up=up, down=down, c=f.c) - f(x)).max() > 1e-2


def test_noise_cancelling_in_pairs_is_not_exact_under_top_k() -> None:
    """net2net's trick (+N on one copy's down weights, -N on its twin's) needs equal weights for both copies."""
    rng = np.random.default_rng(5)
    f = FFN(rng, gated=True, act=_silu)
    noise = rng.normal(size=f.down.shape) * 0.1
    experts = [lambda x: f(x, down=f.down + noise), lambda x: f(x, down=f.down - noise), f, f]
    layout = ne.plan_layout(4, 2)  # top-2 of 4: a token often gets one twin without the other
    x = rng.normal(size=(32, D))
    y = ne.mixture(x, ne.router_weights(rng, D, 4, 1.0, "random"), experts, layout)
    assert np.abs(y - f(x)).max() > 1e-2
    experts = experts[:2]
    both = ne.plan_layout(2, 2)  # both always chosen, but with unequal weights: still not exact
    y = ne.mixture(x, ne.router_weights(rng, D, 2, 1.0, "random"), experts, both)
    assert np.abs(y - f(x)).max() > 1e-3


@pytest.mark.parametrize("args,message", [
    ((4, 2, 4), "exact only with --top-k 4"),
    ((4, 2, 1, "softmax-topk", "random"), "router must start at zero"),
    ((4, 4, 4, "topk-softmax", "random"), "router must start at zero"),
    ((6, 2, 4), "multiple of shards"),
    ((4, 3, 2), "more than the 2 experts"),
    ((1, 1), "at least 2 experts"),
    ((4, 0), "positive whole number"),
    ((4, 2, 1, "sigmoid"), "routing must be one of"),
    ((4, 1), "router never gets a gradient"),
    ((8, 1, 2), "router never gets a gradient"),
])
def test_inexact_layouts_are_refused_with_the_reason(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        ne.plan_layout(*args)


def test_shards_must_divide_the_hidden_units() -> None:
    with pytest.raises(ValueError, match="cannot be split into 3 equal shards"):
        ne.plan_layout(6, 1, 3, hidden=8)


def test_the_router_start_follows_the_routing() -> None:
    assert ne.plan_layout(4, 2).router == "random"
    assert ne.plan_layout(4, 2, routing="softmax-topk").router == "zero"
    assert ne.plan_layout(4, 4, 4).router == "zero"
    assert ne.plan_layout(4, 2, router="zero").router == "zero"  # exact too (ties: the lowest indices)


def test_gates_break_ties_toward_the_lower_index_and_scale_each_group() -> None:
    layout = ne.plan_layout(4, 2, routing="softmax-topk")
    gates = ne.gates(np.zeros((1, 4)), layout)
    np.testing.assert_allclose(gates, [[0.5, 0.5, 0.0, 0.0]])  # 1/4 each, times 4/2
    grouped = ne.plan_layout(8, 2, 2)
    gates = ne.gates(np.arange(8.0)[None], grouped)
    assert list(np.flatnonzero(gates[0])) == [2, 3, 6, 7]
    assert np.allclose(gates[0, :4].sum(), 1.0) and np.allclose(gates[0, 4:].sum(), 1.0)


def test_ffn_multiples_count_the_active_and_the_dense_experts() -> None:
    assert ne.ffn_multiples(ne.plan_layout(4, 2)) == (2.0, 4.0)
    assert ne.ffn_multiples(ne.plan_layout(8, 1, 2, "softmax-topk")) == (1.0, 4.0)  # two half-size experts a token
    assert ne.ffn_multiples(ne.plan_layout(4, 4, 4)) == (1.0, 1.0)  # fine-grained, all active: the FFN itself


@pytest.mark.parametrize("renormalised", [True, False])
def test_replicated_experts_with_shared_logits_and_m_times_k_keep_an_moe_exact(renormalised) -> None:
    """Growing an MoE: E -> m*E experts (copies) and k -> m*k; the copies share their expert's router row."""
    rng = np.random.default_rng(6)
    E, k, m = 4, 2, 3
    x = rng.normal(size=(50, D))
    router = rng.normal(size=(D, E))
    outputs = rng.normal(size=(E, 50, D))  # expert e's output on each token

    def moe(router: np.ndarray, outputs: np.ndarray, k: int) -> np.ndarray:
        logits = x @ router
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, top, -1)
        if renormalised:
            w = w / w.sum(-1, keepdims=True)
        return sum(w[:, j:j + 1] * outputs[top[:, j], np.arange(50)] for j in range(k))

    grown = moe(np.tile(router, (1, m)), np.tile(outputs, (m, 1, 1)), m * k)
    np.testing.assert_allclose(grown, moe(router, outputs, k), rtol=1e-12, atol=1e-12)
    assert np.abs(moe(np.tile(router, (1, m)), np.tile(outputs, (m, 1, 1)), k) - moe(router, outputs, k)).max() > 1e-3
