"""Tests of the numpy depth/parallel/residual solvers against a direct reference conv."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from onnxmorph.numerics import solvers
from onnxmorph.numerics.solvers import (
    carry_bias,
    compose,
    random_orthogonal,
    solve_deepen,
    target_kernel,
)
from onnxmorph.numerics.splitting import split_parallel, split_residual


def ref_conv(x, w, b=None, groups=1, pads=None):
    """Direct N-D grouped cross-correlation, stride 1; ``pads`` is [(begin, end)] per axis."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    if pads is not None:
        x = np.pad(x, [(0, 0)] + list(pads))
    co, ci_g = w.shape[:2]
    k = w.shape[2:]
    out_shape = tuple(x.shape[1 + d] - k[d] + 1 for d in range(nd))
    xg = x.reshape(groups, ci_g, *x.shape[1:])
    wg = w.reshape(groups, co // groups, ci_g, *k)
    out = np.zeros((groups, co // groups, *out_shape))
    for tap in np.ndindex(*k):
        window = tuple(slice(t, t + n) for t, n in zip(tap, out_shape))
        out += np.einsum("goi,gi...->go...", wg[(..., *tap)], xg[(slice(None), slice(None), *window)])
    out = out.reshape(co, *out_shape)
    if b is not None:
        out += np.asarray(b).reshape(co, *([1] * nd))
    return out


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def check_exact(sol, g, k2, groups=1):
    target = target_kernel(g, k2)
    assert sol.residual < 1e-9
    assert rel(compose(sol.f2, sol.f1, groups), target) < 1e-9
    f1, f2 = sol.f1.astype(np.float32), sol.f2.astype(np.float32)
    assert rel(compose(f2, f1, groups), target) < 1e-6


# ------------------------------------------------------------------ composition


@pytest.mark.parametrize(
    "k1,k2,groups", [((3,), (2,), 1), ((3, 2), (2, 3), 2), ((2, 3, 2), (3, 1, 2), 1), ((), (), 2)]
)
def test_compose_equals_two_stacked_convs(k1, k2, groups):
    rng = np.random.default_rng(1)
    ci, cm, co = 4, 6, 4
    f1 = rng.standard_normal((cm, ci // groups, *k1))
    f2 = rng.standard_normal((co, cm // groups, *k2))
    x = rng.standard_normal((ci, *(7,) * len(k1)))
    two = ref_conv(ref_conv(x, f1, groups=groups), f2, groups=groups)
    one = ref_conv(x, compose(f2, f1, groups), groups=groups)
    assert one.shape == two.shape
    assert rel(one, two) < 1e-12


def test_target_kernel_pads_lo_before_and_hi_after():
    g = np.ones((2, 3, 3))
    for k2, lo, hi in [(1, 0, 0), (2, 0, 1), (3, 1, 1), (4, 1, 2)]:
        t = target_kernel(g, (k2,))
        assert t.shape == (2, 3, 3 + k2 - 1)
        assert t[..., lo : lo + 3].all()
        assert not t[..., :lo].any() and not t[..., lo + 3 :].any()
        assert t.shape[-1] - lo - 3 == hi


@pytest.mark.parametrize("rows,cols", [(5, 9), (9, 5), (7, 7), (1030, 1100)])
def test_random_orthogonal_is_orthonormal_and_dense(rows, cols):
    q = random_orthogonal(rows, cols, np.random.default_rng(0))
    gram = q @ q.T if rows <= cols else q.T @ q
    assert np.abs(gram - np.eye(min(rows, cols))).max() < 1e-12
    assert np.count_nonzero(q) == q.size


# ----------------------------------------------------------------- depth morph

DEEPEN_CASES = [
    # (C_out, C_in, K, K2, width, groups)
    (8, 8, (), (), 8, 1),
    (16, 4, (), (), 8, 1),  # width between C_in and C_out
    (4, 16, (), (), 8, 1),
    (6, 10, (), (), 6, 1),
    (8, 8, (), (), 20, 1),
    (8, 8, (1, 1), (1, 1), 8, 1),
    (8, 8, (1, 1), (3, 3), 8, 1),
    (8, 8, (3, 3), (1, 1), 8, 1),
    (8, 8, (3, 3), (2, 2), 8, 1),
    (8, 8, (3, 3), (3, 3), 8, 1),
    (8, 8, (3, 3), (4, 4), 8, 1),
    (8, 8, (3, 3), (5, 5), 8, 1),
    (8, 6, (3, 3), (3, 3), 12, 1),
    (6, 8, (5, 5), (1, 1), 6, 1),
    (6, 6, (5, 5), (2, 2), 6, 1),
    (6, 6, (5, 5), (3, 3), 6, 1),
    (6, 6, (5, 5), (5, 5), 6, 1),
    (16, 4, (3, 3), (5, 5), 4, 1),  # width < C_out: layer 1 shrinks to 1x1
    (8, 8, (3, 3), (3, 1), 8, 1),
    (4, 4, (3,), (3,), 4, 1),
    (4, 4, (3,), (2,), 4, 1),
    (4, 4, (3, 3, 3), (3, 3, 3), 4, 1),
    (4, 4, (3, 3, 3), (2, 2, 2), 4, 1),
    (8, 8, (3, 3), (3, 3), 8, 2),
    (8, 8, (3, 3), (3, 3), 16, 4),
    (16, 16, (3, 3), (3, 3), 16, 16),  # depthwise
    (16, 16, (3, 3), (2, 2), 32, 16),  # depthwise, multiplier 2
    (16, 16, (5, 5), (5, 5), 16, 16),
]


@pytest.mark.parametrize("co,ci,k,k2,width,groups", DEEPEN_CASES)
def test_solve_deepen_is_exact(co, ci, k, k2, width, groups):
    rng = np.random.default_rng(hash((co, ci, k, k2, width, groups)) % 2**32)
    g = rng.standard_normal((co, ci // groups, *k))
    sol = solve_deepen(g, k2, width, rng, groups=groups)
    assert sol.f1.shape == (width, ci // groups, *k)
    assert sol.f2.shape == (co, width // groups, *k2)
    assert sol.f1.dtype == np.float64 and sol.f2.dtype == np.float64
    check_exact(sol, g, k2, groups)


@pytest.mark.parametrize("k2", [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_deepened_pair_matches_parent_conv_including_border(k2):
    rng = np.random.default_rng(5)
    g = rng.standard_normal((6, 6, 3, 3))
    b = rng.standard_normal(6)
    b1 = rng.standard_normal(6)
    sol = solve_deepen(g, k2, 6, rng)
    b2 = carry_bias(sol.f2, b1, b)
    x = rng.standard_normal((6, 7, 8))
    parent = ref_conv(x, g, b, pads=[(1, 1), (1, 1)])
    lo = [(k - 1) // 2 for k in k2]
    hi = [k - 1 - a for k, a in zip(k2, lo)]
    mid = ref_conv(x, sol.f1, b1, pads=[(1 + lo[0], 1 + hi[0]), (1 + lo[1], 1 + hi[1])])
    child = ref_conv(mid, sol.f2, b2)
    assert child.shape == parent.shape
    assert rel(child, parent) < 1e-10


def test_algorithm1_used_when_wide_enough_gives_dense_full_kernels():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((8, 8, 3, 3))
    sol = solve_deepen(g, (3, 3), 23, rng)
    assert sol.algorithm == "alg1-exact"
    assert sol.iterations == 1
    check_exact(sol, g, (3, 3))
    ring = sol.f2.copy()
    ring[..., 1, 1] = 0.0
    assert np.count_nonzero(ring) == 8 * 23 * 8  # every off-centre tap is used
    assert np.count_nonzero(sol.f1) == sol.f1.size


def test_algorithm2_used_when_narrow_and_is_dense_unlike_identity():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((64, 64, 3, 3))
    net = solve_deepen(g, (3, 3), 64, rng)
    assert net.algorithm == "alg2-shrink(k2->1x1)"
    check_exact(net, g, (3, 3))
    assert np.count_nonzero(net.f2) == 64 * 64
    assert np.count_nonzero(net.f1) == net.f1.size
    ident = solve_deepen(g, (3, 3), 64, rng, method="identity")
    assert ident.algorithm == "identity"
    check_exact(ident, g, (3, 3))
    assert np.count_nonzero(ident.f2) == 64


def test_algorithm2_shrinks_layer1_when_k2_exceeds_k():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((8, 8, 3, 3))
    sol = solve_deepen(g, (5, 5), 8, rng)
    assert sol.algorithm == "alg2-shrink(k1->1x1)"
    check_exact(sol, g, (5, 5))
    assert np.count_nonzero(sol.f1) == np.count_nonzero(sol.f1[..., 1, 1]) == 64
    # Layer 1 is a dense channel mix, so layer 2 carries G's 3x3 support, dense in channels.
    assert np.count_nonzero(sol.f2) == np.count_nonzero(sol.f2[..., 1:4, 1:4]) == 8 * 8 * 9


def test_identity_puts_the_one_at_tap_lo_and_pads_extra_rows():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((4, 4, 3))
    sol = solve_deepen(g, (4,), 6, rng, method="identity")
    check_exact(sol, g, (4,))
    assert np.array_equal(sol.f2[:, :4, 1], np.eye(4))
    assert not sol.f1[4:].any()
    with pytest.raises(ValueError, match="width"):
        solve_deepen(g, (4,), 3, rng, method="identity")


def test_scales_are_balanced():
    rng = np.random.default_rng(7)
    g = 30.0 * rng.standard_normal((8, 8, 3, 3))
    for width in (8, 23):
        sol = solve_deepen(g, (3, 3), width, rng)
        r1 = np.sqrt(np.mean(sol.f1**2))
        r2 = np.sqrt(np.mean(sol.f2**2))
        assert abs(r1 / r2 - 1.0) < 1e-9


@pytest.mark.parametrize(
    "shape,k2,width,needed",
    [((16, 16, 3, 3), (3, 3), 8, 16), ((16, 4), (), 3, 4), ((16, 4, 3, 3), (1, 1), 8, 16)],
)
def test_too_narrow_width_raises_with_minimum(shape, k2, width, needed):
    rng = np.random.default_rng(8)
    g = rng.standard_normal(shape)
    with pytest.raises(ValueError, match=f"width >= {needed}"):
        solve_deepen(g, k2, width, rng)


def test_low_rank_parent_fits_a_narrow_width():
    rng = np.random.default_rng(9)
    g = np.einsum("or,rik->oik", rng.standard_normal((16, 3)), rng.standard_normal((3, 16, 9)))
    g = g.reshape(16, 16, 3, 3)
    sol = solve_deepen(g, (3, 3), 4, rng)
    assert sol.algorithm == "alg2-lowrank"
    check_exact(sol, g, (3, 3))
    assert np.count_nonzero(sol.f2[..., 1, 1]) == 16 * 4


def test_zero_parent_gives_exact_nonzero_layer2():
    rng = np.random.default_rng(10)
    g = np.zeros((8, 8, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for width in (8, 4):
            sol = solve_deepen(g, (3, 3), width, rng)
            assert sol.residual == 0.0
            assert not sol.f1.any()
            assert np.count_nonzero(sol.f2) > 0


def test_seeded_rng_is_deterministic():
    g = np.random.default_rng(11).standard_normal((8, 8, 3, 3))
    a = solve_deepen(g, (3, 3), 12, np.random.default_rng(42))
    b = solve_deepen(g, (3, 3), 12, np.random.default_rng(42))
    c = solve_deepen(g, (3, 3), 12, np.random.default_rng(43))
    assert np.array_equal(a.f1, b.f1) and np.array_equal(a.f2, b.f2)
    assert not np.allclose(a.f2, c.f2)


def test_bad_arguments_raise():
    rng = np.random.default_rng(12)
    g = rng.standard_normal((8, 8, 3, 3))
    with pytest.raises(ValueError, match="axes"):
        solve_deepen(g, (3,), 8, rng)
    with pytest.raises(ValueError, match="groups"):
        solve_deepen(g, (3, 3), 9, rng, groups=2)
    with pytest.raises(ValueError, match="method"):
        solve_deepen(g, (3, 3), 8, rng, method="bogus")


@pytest.mark.parametrize("shape,k2", [((256, 256, 3, 3), (1, 1)), ((256, 256, 3, 3), (3, 3)), ((1024, 1024), ())])
def test_large_layers_are_exact(shape, k2):
    # Speed is measured by benchmarks/run.py (4096x4096 Gemm included), not asserted here.
    rng = np.random.default_rng(13)
    g = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    sol = solve_deepen(g, k2, shape[0], rng)
    assert sol.residual < 1e-6
    assert np.count_nonzero(sol.f2) > 0.5 * sol.f2.shape[0] * sol.f2.shape[1]


# ------------------------------------------------- fast orthogonal transform and sketch


def dct_matrix(n):
    """Orthonormal DCT-II matrix, with the phase reduced exactly before the cosine."""
    phase = ((2 * np.arange(n)[None, :] + 1) * np.arange(n)[:, None]) % (4 * n)
    d = np.cos(np.pi * phase / (2.0 * n)) * np.sqrt(2.0 / n)
    d[0] *= np.sqrt(0.5)
    return d


@pytest.mark.parametrize("n", [1, 2, 3, 8, 65, 130])
def test_fft_dct_equals_dct_matrix(n):
    x = np.random.default_rng(n).standard_normal((n, 3, 2))
    d = dct_matrix(n)
    assert np.abs(solvers.idct_rows(x) - np.einsum("ba,b...->a...", d, x)).max() < 1e-12


@pytest.mark.parametrize("n,m", [(5, 7), (64, 64), (200, 130), (200, 30), (256, 200)])
def test_block_diagonal_batched_products_equal_the_dense_matrix(n, m):
    blocks = solvers.BlockDiagonal(n, np.random.default_rng(n))
    dense = np.zeros((n, n))
    if blocks.full is not None:
        for i, block in enumerate(blocks.full):
            dense[64 * i : 64 * (i + 1), 64 * i : 64 * (i + 1)] = block
    if blocks.rem is not None:
        dense[blocks.main :, blocks.main :] = blocks.rem
    assert np.abs(dense @ dense.T - np.eye(n)).max() < 1e-12
    x = np.random.default_rng(2).standard_normal((n, m))
    assert np.abs(blocks.left(x) - dense @ x).max() < 1e-12
    assert np.abs(blocks.left(x, transpose=True) - dense.T @ x).max() < 1e-12
    assert np.abs(blocks.right(x.T) - x.T @ dense).max() < 1e-12


@pytest.mark.parametrize("n", [5, 64, 200, 1030])
def test_mixed_dct_fast_products_equal_the_dense_matrix(n):
    op = solvers.MixedDCT(n, np.random.default_rng(n))
    q = op.dense()
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-12
    assert np.count_nonzero(q) == q.size
    x = np.random.default_rng(1).standard_normal((n, 37))
    assert np.abs(op.apply_t(x) - q.T @ x).max() < 1e-12
    # The same seed gives the same operator; a different seed a different one.
    assert np.array_equal(solvers.MixedDCT(n, np.random.default_rng(n)).dense(), q)
    assert not np.allclose(solvers.MixedDCT(n, np.random.default_rng(n + 1)).dense(), q)


@pytest.mark.parametrize(
    "shape,width,solve_f1",
    [((1040, 1050), 1100, True),  # F2 = Q[:1040, :1100] fixed: the transform pads G
     ((1050, 1040), 1100, False),  # F1.T = Q[:1040, :1100] fixed (more unknowns per equation)
     ((1100, 1050), 1060, False),  # width < C_out: only the F2 solve is exact
     ((1030, 1030), 1030, True)],
)
def test_fast_transform_solve_equals_dense_solve(shape, width, solve_f1):
    plans, _ = solvers.choose_plans((), (), 1, shape[0], shape[1], width)
    assert plans[0].solve_f1 == solve_f1
    g = np.random.default_rng(21).standard_normal(shape) / np.sqrt(shape[1])
    sol = solve_deepen(g, (), width, np.random.default_rng(5))
    check_exact(sol, g, ())
    # Replay the fixed factor from the same seed and solve densely by its transpose.
    stack, ops = solvers.orthogonal_stack_ops(
        1, *((shape[0], width) if solve_f1 else (shape[1], width)), np.random.default_rng(5)
    )
    assert ops is not None
    fixed = stack[0]
    # Balancing scaled the fixed factor by a scalar a and the solved one by 1 / a.
    fixed_out, solved, expected = (
        (sol.f2, sol.f1, fixed.T @ g) if solve_f1 else (sol.f1.T, sol.f2, g @ fixed)
    )
    a = np.vdot(fixed_out, fixed) / np.vdot(fixed, fixed)
    assert np.abs(fixed_out - a * fixed).max() < 1e-12 * np.abs(fixed_out).max()
    assert np.abs(solved * a - expected).max() < 1e-12 * np.abs(expected).max()


@pytest.mark.parametrize("k1,k2", [((3, 3), ()), ((), (3, 3)), ((), ())])
def test_sketched_residual_tracks_dense_residual_and_catches_corruption(monkeypatch, k1, k2):
    rng = np.random.default_rng(22)
    ci, cm, co = 40, 48, 36
    k1 = k1 if k1 else (1, 1) * bool(k2)
    k2 = k2 if k2 else (1, 1) * bool(k1)
    f1 = rng.standard_normal((1, cm, ci, *k1))
    f2 = rng.standard_normal((1, co, cm, *k2))
    target = solvers.compose_grouped(f2, f1)
    dense = solvers.composite_residual(target, f2, f1)  # small: exact path
    monkeypatch.setattr(solvers, "_SKETCH_MIN_WORK", 0)
    assert dense < 1e-14 and solvers.composite_residual(target, f2, f1) < 1e-14
    for corrupt in ("entry", "column", "scale"):
        bad = f1.copy()
        if corrupt == "entry":
            bad.flat[1234] += 1e-6
        elif corrupt == "column":
            bad[0, 3] = bad[0, 4]
        else:
            bad *= 1.0 + 1e-7
        sketched = solvers.composite_residual(target, f2, bad)
        monkeypatch.setattr(solvers, "_SKETCH_MIN_WORK", 2**62)
        exact = solvers.composite_residual(target, f2, bad)
        monkeypatch.setattr(solvers, "_SKETCH_MIN_WORK", 0)
        assert exact > 1e-9
        assert exact / 10 < sketched < exact * 10, corrupt


def test_large_gemm_solve_uses_sketch_and_reports_true_residual():
    # 1100^3 multiply-adds: above _SKETCH_MIN_WORK, so the reported residual is sketched.
    g = np.random.default_rng(23).standard_normal((1100, 1100)) / 33.0
    sol = solve_deepen(g, (), 1100, np.random.default_rng(0))
    true = rel(sol.f2 @ sol.f1, g)
    assert true < 1e-13 and sol.residual < 1e-13
    assert sol.algorithm == "alg1-exact"


def test_corrupted_fast_transform_is_caught_by_the_residual_check(monkeypatch):
    # A transform off by 1e-6 gives inexact factors; the sketched check must reject both
    # one-shot plans, and the alternation (dense pseudo-inverse) must then repair them.
    exact_apply_t = solvers.MixedDCT.apply_t
    monkeypatch.setattr(solvers.MixedDCT, "apply_t", lambda self, x: exact_apply_t(self, x) * (1 + 1e-6))
    g = np.random.default_rng(24).standard_normal((1030, 1030)) / 32.0
    sol = solve_deepen(g, (), 1030, np.random.default_rng(0))
    assert sol.algorithm == "alg1-als" and sol.iterations >= 2
    check_exact(sol, g, ())


# ------------------------------------------------------------------------- bias


def test_carry_bias_keeps_parent_bias_grouped():
    rng = np.random.default_rng(14)
    groups = 2
    g = rng.standard_normal((6, 4 // groups, 3, 3))
    b = rng.standard_normal(6)
    sol = solve_deepen(g, (3, 3), 8, rng, groups=groups)
    b1 = rng.standard_normal(8)
    b2 = carry_bias(sol.f2, b1, b, groups)
    x = rng.standard_normal((4, 9, 9))
    parent = ref_conv(x, g, b, groups=groups, pads=[(1, 1), (1, 1)])
    mid = ref_conv(x, sol.f1, b1, groups=groups, pads=[(2, 2), (2, 2)])
    child = ref_conv(mid, sol.f2, b2, groups=groups)
    assert rel(child, parent) < 1e-10
    # Without the correction the pair is off by layer 1's bias.
    wrong = ref_conv(mid, sol.f2, b, groups=groups)
    assert rel(wrong, parent) > 1e-3


# --------------------------------------------------------- parallel and residual


def centred(branch, k):
    off = [(a - b) // 2 for a, b in zip(k, branch.shape[2:])]
    return np.pad(branch, [(0, 0), (0, 0)] + [(o, a - b - o) for o, a, b in zip(off, k, branch.shape[2:])])


@pytest.mark.parametrize(
    "k,kernels",
    [((3, 3), [(3, 3), (1, 1), (3, 3)]), ((5, 5), [(1, 1), (5, 5), (3, 3)]), ((4,), [(2,), (4,)]),
     ((), [(), (), ()])],
)
def test_split_parallel_sums_to_parent(k, kernels):
    rng = np.random.default_rng(15)
    g = rng.standard_normal((6, 4, *k))
    parts = split_parallel(g, kernels, rng)
    assert [p.shape[2:] for p in parts] == [tuple(kk) for kk in kernels]
    assert all(np.count_nonzero(p) == p.size for p in parts)
    total = sum(centred(p, k) for p in parts)
    assert rel(total, g) < 1e-12
    x = rng.standard_normal((4, *(6,) * len(k)))
    pads = [((a - 1) // 2, a - 1 - (a - 1) // 2) for a in k]
    outs = []
    for p in parts:
        off = [(a - b) // 2 for a, b in zip(k, p.shape[2:])]
        ppads = [(lo - o, hi - (a - b - o)) for (lo, hi), o, a, b in zip(pads, off, k, p.shape[2:])]
        outs.append(ref_conv(x, p, pads=ppads))
    assert rel(sum(outs), ref_conv(x, g, pads=pads)) < 1e-12


def test_split_parallel_rejects_impossible_kernels():
    rng = np.random.default_rng(16)
    g = rng.standard_normal((4, 4, 3, 3))
    with pytest.raises(ValueError, match="larger than the parent"):
        split_parallel(g, [(5, 5), (3, 3)], rng)
    with pytest.raises(ValueError, match="non-zero outside"):
        split_parallel(g, [(1, 1), (1, 1)], rng)
    with pytest.raises(ValueError, match="largest kernel"):
        split_parallel(g, [(1, 3), (3, 1)], rng)
    # A parent that vanishes outside the centre tap can be split into 1x1 branches.
    g_centre = np.zeros_like(g)
    g_centre[..., 1, 1] = g[..., 1, 1]
    parts = split_parallel(g_centre, [(1, 1), (1, 1)], rng)
    assert rel(sum(centred(p, (3, 3)) for p in parts), g_centre) < 1e-12


@pytest.mark.parametrize("k,k_branch,width,groups", [((3, 3), (3, 3), 8, 1), ((3, 3), (1, 1), 4, 2), ((), (), 5, 1)])
def test_split_residual_is_exact_and_every_part_nonzero(k, k_branch, width, groups):
    rng = np.random.default_rng(17)
    g = rng.standard_normal((6, 6 // groups, *k))
    main, f1, f2 = split_residual(g, k_branch, width, rng, groups=groups)
    assert main.shape == target_kernel(g, k_branch).shape
    assert f1.shape == (width, 6 // groups, *k) and f2.shape == (6, width // groups, *k_branch)
    for part in (main, f1, f2):
        assert np.count_nonzero(part) == part.size
    total = main + compose(f2, f1, groups)
    assert rel(total, target_kernel(g, k_branch)) < 1e-12
    branch_share = np.linalg.norm(compose(f2, f1, groups)) / np.linalg.norm(g)
    assert abs(branch_share - 0.5) < 1e-9
