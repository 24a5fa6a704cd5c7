"""Pure-numpy weight solvers for the depth, parallel and residual morphs (no ONNX here).

Conventions shared by every function in this module:

* A filter is ``[C_out, C_in/groups, *kernel]`` with 0 to 3 spatial axes (a Gemm or
  MatMul weight is the 0-D case ``[C_out, C_in]``). ONNX Conv is a cross-correlation.
* Two stacked layers (stride 1 on layer 1, the intermediate tensor never zero-padded)
  equal one layer whose filter is ``compose(f2, f1)``:
  ``G~[o, i] = sum_m F2[o, m] (*) F1[m, i]``, ``(*)`` being the FULL (true) convolution,
  so the composite kernel is ``K1 + K2 - 1`` per axis.
* The depth morph keeps layer 1's kernel equal to the parent's ``K`` and gives layer 2
  the kernel ``K2``. The target is the parent filter zero-padded per axis by
  ``lo = (K2 - 1) // 2`` before and ``hi = K2 - 1 - lo`` after (``target_kernel``).
  The graph pass makes the pair exact, image border included, by giving layer 1 the
  pads ``P_begin + dilation * lo`` / ``P_end + dilation * hi`` and layer 2 pads 0
  (strides go on layer 2, dilation on both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxmorph.numerics.orthogonal import (  # noqa: F401  (re-exported: the structured factor is part of the solvers)
    BlockDiagonal,
    MixedDCT,
    idct_rows,
    orthogonal_stack,
    orthogonal_stack_ops,
    random_orthogonal,
)

__all__ = [
    "DepthSolution",
    "carry_bias",
    "compose",
    "random_orthogonal",
    "solve_deepen",
    "target_kernel",
]

# Largest explicit convolution operator (in float64 entries, all groups together) that
# the multi-tap solve may build before a cheaper exact plan is preferred.
_MAX_OPERATOR_ENTRIES = 4_000_000
# Residual checks of more multiply-adds than this use a randomized sketch with this many
# Gaussian probes (see composite_residual) instead of the dense composition.
_SKETCH_MIN_WORK = 2**30
_SKETCH_PROBES = 16
_SKETCH_SEED = 0x5EED


@dataclass(frozen=True)
class DepthSolution:
    """Weights of the two layers that replace one parent layer.

    ``algorithm`` is one of:

    * ``"alg1-exact"``: the paper's Algorithm 1, both factors at full kernel size; one
      random factor was fixed and the other solved exactly in one linear solve.
    * ``"alg1-als"``: Algorithm 1 needed more than one alternating least-squares step.
    * ``"alg2-shrink(k2->AxB)"`` / ``"alg2-shrink(k1->AxB)"``: Algorithm 2, the named
      factor's support was shrunk (centred) to ``AxB`` to make the solve exact, then
      zero-padded back to its requested kernel.
    * ``"alg2-lowrank"``: the counting condition fails but ``G`` has rank at most
      ``width / groups`` per group, so a 1x1 layer 2 spanning ``G``'s range is exact.
    * ``"identity"``: IdMorph / Net2DeeperNet (layer 2 is an identity at tap ``lo``).

    ``residual`` is ``||compose(f2, f1) - target|| / ||target||`` (Frobenius), computed
    densely, or, when one factor is 1x1 and the composition would cost over 2^30
    multiply-adds, estimated from 16 random probes (see ``composite_residual``).
    """

    f1: np.ndarray
    f2: np.ndarray
    residual: float
    algorithm: str
    iterations: int


# --------------------------------------------------------------------------- helpers


def as_kernel(k: Sequence[int], nd: int, what: str) -> tuple[int, ...]:
    k = tuple(int(v) for v in k)
    if len(k) != nd:
        raise ValueError(f"{what} has {len(k)} axes but the filter has {nd} spatial axes")
    if any(v < 1 for v in k):
        raise ValueError(f"{what} must be positive on every axis, got {k}")
    return k


def _lo_hi(k2: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lo = tuple((k - 1) // 2 for k in k2)
    hi = tuple(k - 1 - a for k, a in zip(k2, lo))
    return lo, hi


def rms(a: np.ndarray) -> float:
    if not a.size:
        return 0.0
    flat = a.ravel()
    return math.sqrt(float(np.dot(flat, flat)) / a.size)


def _rel_error(target: np.ndarray, approx: np.ndarray) -> float:
    diff = (target - approx).ravel()
    norm = math.sqrt(float(np.dot(target.ravel(), target.ravel())))
    err = math.sqrt(float(np.dot(diff, diff)))
    if norm == 0.0:
        return err
    return err / norm


def _split_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """``[C_out, C_in_g, *k]`` -> ``[groups, C_out_g, C_in_g, *k]``."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def pad_support(
    a: np.ndarray, offset: Sequence[int], full: Sequence[int]
) -> np.ndarray:
    """Zero-pad the trailing spatial axes of ``a`` to ``full``, placing ``a`` at ``offset``."""
    nd = len(full)
    lead = a.ndim - nd
    if tuple(a.shape[lead:]) == tuple(full):
        return a  # nothing to pad; avoid copying a large weight
    widths = [(0, 0)] * lead + [
        (o, f - o - s) for o, f, s in zip(offset, full, a.shape[lead:])
    ]
    return np.pad(a, widths)


# ----------------------------------------------------------------- kernel algebra


def compose(f2: np.ndarray, f1: np.ndarray, groups: int = 1) -> np.ndarray:
    """Filter of layer 2 applied after layer 1 (float64), ``[Co, Ci/groups, *(K1+K2-1)]``.

    Grouped convolutions compose group by group: layer 1's output channels of group q
    are exactly layer 2's input channels of group q.
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if f1.ndim != f2.ndim or f1.ndim < 2:
        raise ValueError(f"filters of rank {f2.ndim} and {f1.ndim} cannot be composed")
    cm, ci_g = f1.shape[:2]
    co, cm_g = f2.shape[:2]
    if cm % groups or co % groups or cm // groups != cm_g:
        raise ValueError(
            f"layer 2 expects {cm_g * groups} input channels in {groups} groups but "
            f"layer 1 has {cm} outputs (co={co})"
        )
    k1, k2 = f1.shape[2:], f2.shape[2:]
    kt = tuple(a + b - 1 for a, b in zip(k1, k2))
    a1 = _split_groups(f1, groups).reshape(groups, cm_g, -1)
    b2 = _split_groups(f2, groups)
    out = np.zeros((groups, co // groups, ci_g, *kt))
    # One batched matmul per tap of F2 (at most 125); all-zero taps (the ring of a
    # shrunk factor) are skipped, which keeps big 1x1-like compositions cheap.
    for tap in np.ndindex(*k2):
        w = b2[(..., *tap)]
        if not w.any():
            continue
        part = np.matmul(w, a1).reshape(groups, co // groups, ci_g, *k1)
        window = tuple(slice(t, t + k) for t, k in zip(tap, k1))
        out[(slice(None), slice(None), slice(None), *window)] += part
    return out.reshape(co, ci_g, *kt)


def target_kernel(g: np.ndarray, k2: Sequence[int]) -> np.ndarray:
    """Parent filter zero-padded to ``K + K2 - 1``: ``(K2-1)//2`` before, the rest after.

    This is what ``compose(f2, f1)`` must equal for the depth morph; it is also the
    tap ``lo`` at which an identity layer 2 reproduces the parent.
    """
    g = np.asarray(g, dtype=np.float64)
    k2 = as_kernel(k2, g.ndim - 2, "k2")
    lo, hi = _lo_hi(k2)
    return np.pad(g, [(0, 0), (0, 0)] + list(zip(lo, hi)))


def carry_bias(f2: np.ndarray, b1: np.ndarray, b: np.ndarray, groups: int = 1) -> np.ndarray:
    """Bias of layer 2 so that the pair keeps the parent's bias ``b``.

    Layer 1's bias ``b1`` reaches output ``o`` through every tap of ``F2[o, m]``, so
    ``b2[o] = b[o] - sum_{m in o's group, taps} F2[o, m, taps] * b1[m]``. Exact only
    while layer 2 never zero-pads its input (the padding convention of this module).
    """
    f2 = np.asarray(f2, dtype=np.float64)
    b1 = np.asarray(b1, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    co, cm_g = f2.shape[:2]
    if b.shape != (co,) or b1.shape != (cm_g * groups,):
        raise ValueError(
            f"bias shapes {b1.shape} (layer 1) and {b.shape} (parent) do not match a "
            f"layer 2 of {co} outputs and {cm_g * groups} inputs in {groups} groups"
        )
    tap_sum = f2.reshape(groups, co // groups, cm_g, -1).sum(axis=-1)
    leak = np.einsum("gom,gm->go", tap_sum, b1.reshape(groups, cm_g))
    return b - leak.reshape(co)


# ------------------------------------------------------------------- depth solver


@dataclass(frozen=True)
class _Plan:
    """Supports of both factors (offset and size per axis) and which one is solved."""

    name: str
    a1: tuple[int, ...]
    s1: tuple[int, ...]
    a2: tuple[int, ...]
    s2: tuple[int, ...]
    solve_f1: bool  # True: F2 random and fixed, F1 solved; False: the reverse

    @property
    def window(self) -> tuple[slice, ...]:
        return tuple(
            slice(a + b, a + b + x + y - 1)
            for a, b, x, y in zip(self.a1, self.a2, self.s1, self.s2)
        )

    def operator_entries(self, groups: int, co_g: int, ci_g: int, cm_g: int) -> int:
        fixed = self.s2 if self.solve_f1 else self.s1
        if math.prod(fixed) == 1:
            return 0  # the 1x1 case never builds an operator
        w = math.prod(x + y - 1 for x, y in zip(self.s1, self.s2))
        rows = (co_g if self.solve_f1 else ci_g) * w
        cols = cm_g * math.prod(self.s1 if self.solve_f1 else self.s2)
        return groups * rows * cols


def _required_width(s1: Sequence[int], s2: Sequence[int], co_g: int, ci_g: int) -> tuple[int, int]:
    """Per-group widths making the F1 solve (F2 fixed) and the F2 solve exact by counting."""
    w = math.prod(x + y - 1 for x, y in zip(s1, s2))
    return -(-co_g * w // math.prod(s1)), -(-ci_g * w // math.prod(s2))


def _candidate_supports(k: tuple[int, ...], k2: tuple[int, ...]):
    """Yield (name, a1, s1, a2, s2) from no shrinking to the 1x1 limit, F2 first on ties.

    Shrinking F2 keeps tap ``lo`` inside its support, shrinking F1 trims at most ``lo``
    before and ``hi`` after: either way the composite window still covers ``G``.
    """
    lo, hi = _lo_hi(k2)
    full1, zero1 = k, (0,) * len(k)
    yield "alg1", zero1, full1, zero1, k2
    step = 1
    prev2, prev1 = k2, full1
    while True:
        s2 = tuple(max(x - 2 * step, 1) for x in k2)
        a2 = tuple(a - (s - 1) // 2 for a, s in zip(lo, s2))
        trim = tuple(min(step, a, b, (x - 1) // 2) for a, b, x in zip(lo, hi, k))
        s1 = tuple(x - 2 * t for x, t in zip(k, trim))
        grew = False
        if s2 != prev2:
            label = "x".join(map(str, s2)) or "1"
            yield f"alg2-shrink(k2->{label})", zero1, full1, a2, s2
            grew = True
        if s1 != prev1:
            label = "x".join(map(str, s1)) or "1"
            yield f"alg2-shrink(k1->{label})", trim, s1, zero1, k2
            grew = True
        if not grew:
            return
        prev2, prev1 = s2, s1
        step += 1


def choose_plans(
    k: tuple[int, ...], k2: tuple[int, ...], groups: int, co_g: int, ci_g: int, cm_g: int
) -> tuple[list[_Plan], int]:
    """Plans that are exact by counting, in the order to try them, and the minimum width.

    Counting is necessary but, with two or more spatial axes, not sufficient: e.g. two
    2x2 filters of one output channel have common zeros (as bivariate polynomials), so
    their span misses some targets. The caller therefore checks each plan's residual.
    """
    feasible: list[_Plan] = []
    min_width = None
    for name, a1, s1, a2, s2 in _candidate_supports(k, k2):
        need_f1, need_f2 = _required_width(s1, s2, co_g, ci_g)
        need = min(need_f1, need_f2)
        min_width = need if min_width is None else min(min_width, need)
        options = []
        if cm_g >= need_f1:
            options.append(_Plan(name, a1, s1, a2, s2, True))
        if cm_g >= need_f2:
            options.append(_Plan(name, a1, s1, a2, s2, False))
        # Prefer a 1x1 fixed factor (its pseudo-inverse is a transpose), then the
        # direction with the larger surplus of unknowns (better conditioned).
        w = math.prod(x + y - 1 for x, y in zip(s1, s2))

        def key(p: _Plan, w: int = w) -> tuple[bool, float]:
            fixed = p.s2 if p.solve_f1 else p.s1
            unknowns = cm_g * math.prod(p.s1 if p.solve_f1 else p.s2)
            eqs = (co_g if p.solve_f1 else ci_g) * w
            return (math.prod(fixed) != 1, -unknowns / eqs)

        feasible.extend(sorted(options, key=key))
    assert min_width is not None
    # Huge explicit operators go last: a cheaper exact plan (usually the 1x1 limit of
    # Algorithm 2) is almost always available.
    cheap = [p for p in feasible if p.operator_entries(groups, co_g, ci_g, cm_g)
             <= _MAX_OPERATOR_ENTRIES]
    return cheap + [p for p in feasible if p not in cheap], min_width


def _conv_operator(fixed: np.ndarray, unknown: tuple[int, ...]) -> np.ndarray:
    """Matrix of ``X -> fixed (*) X`` (full convolution, contracting the channel q).

    ``fixed`` is ``[G, p, q, *S]``; the result is ``[G, p*prod(S+U-1), q*prod(U)]`` with
    entry ``[(p, w), (q, u)] = fixed[p, q, w - u]``.
    """
    n, p, q = fixed.shape[:3]
    s = fixed.shape[3:]
    w = tuple(a + b - 1 for a, b in zip(s, unknown))
    op = np.zeros((n, p, *w, q, *unknown))
    moved = np.moveaxis(fixed, 2, -1)  # [G, p, *S, q]
    for u in np.ndindex(*unknown):
        idx = (slice(None), slice(None), *(slice(a, a + b) for a, b in zip(u, s)))
        op[(*idx, slice(None), *u)] = moved
    return op.reshape(n, p * math.prod(w), q * math.prod(unknown))


def _min_norm_solve(op: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Minimum-norm solution of ``op @ x = rhs`` (wide ``op``), batched, via QR of op^T.

    QR keeps the conditioning of ``op`` (normal equations would square it).
    """
    q, r = np.linalg.qr(np.swapaxes(op, -1, -2))
    return q @ np.linalg.solve(np.swapaxes(r, -1, -2), rhs)


def _solve_channel_factor(
    fixed: np.ndarray,
    rhs: np.ndarray,
    unknown: tuple[int, ...],
    first: bool,
    fast: list[MixedDCT] | None = None,
) -> np.ndarray:
    """Solve ``fixed (*) X = rhs`` for X ``[G, q, n, *U]``; fixed ``[G, p, q, *S]``,
    rhs ``[G, p, n, *W]``. On the first step the fixed factor has orthonormal rows
    (as a ``p x q*prod(S)`` matrix), which the 1x1 case turns into a transpose.
    ``fast`` (first step only): per group, the operator ``Q`` whose leading ``p x q``
    block is the fixed factor, so ``fixed.T @ rhs`` is one O(n^2 log n) transform.
    """
    n_g, p, q = fixed.shape[:3]
    n_rhs = rhs.shape[2]
    if math.prod(fixed.shape[3:]) == 1:
        b = rhs.reshape(n_g, p, -1)
        if first and fast is not None:
            # Q[:p, :q].T @ b == (Q.T @ [b; 0])[:q]
            parts = [
                op.apply_t(np.pad(bg, [(0, op.n - p), (0, 0)]) if op.n > p else bg)[:q]
                for op, bg in zip(fast, b)
            ]
            x = parts[0][None] if n_g == 1 else np.stack(parts)  # one group: no copy
        else:
            m = fixed.reshape(n_g, p, q)
            pinv = np.swapaxes(m, -1, -2) if first else np.linalg.pinv(m)
            x = pinv @ b
        return x.reshape(n_g, q, n_rhs, *unknown)
    op = _conv_operator(fixed, unknown)
    b = np.moveaxis(rhs, 2, -1).reshape(n_g, op.shape[1], n_rhs)
    x = _min_norm_solve(op, b) if first else np.linalg.pinv(op) @ b
    return np.moveaxis(x.reshape(n_g, q, *unknown, n_rhs), -1, 2)


def compose_grouped(f2g: np.ndarray, f1g: np.ndarray) -> np.ndarray:
    n = f2g.shape[0]
    flat = compose(
        f2g.reshape(-1, *f2g.shape[2:]), f1g.reshape(-1, *f1g.shape[2:]), groups=n
    )
    return flat.reshape(n, f2g.shape[1], *flat.shape[1:])


def composite_residual(tw: np.ndarray, f2g: np.ndarray, f1g: np.ndarray) -> float:
    """Relative Frobenius residual ``||compose(F2, F1) - T|| / ||T||`` of grouped factors.

    Exact (dense composition) for small problems. When one factor is 1x1 the composite
    is a matrix product ``A = M2 @ M1``, and above ``_SKETCH_MIN_WORK`` multiply-adds the
    residual is estimated from ``_SKETCH_PROBES`` Gaussian probe columns ``X`` instead:
    ``||(M2 @ M1 - T) X||_F^2 / p`` costs O(n^2 p), not O(n^3). Guarantee: for any
    residual matrix ``E`` independent of ``X``, ``||E X||_F^2 / (p ||E||_F^2)`` is a convex
    combination of ``chi^2_p / p`` variables (weights ``sigma_i^2 / ||E||_F^2``), so it is
    unbiased, and a Chernoff bound (the moment generating function is largest in the
    rank-one case) gives ``P(estimate <= tau ||E||_F) <= (tau^2 exp(1 - tau^2))^(p / 2)``:
    with p = 16 an underestimate by a factor 10 has probability below 3e-13, so factors
    whose true residual is 10x the exactness tolerance practically never pass it. The
    probes come from a fixed seed, which keeps the solver deterministic and leaves the
    caller's RNG untouched.
    """
    n_g, co_g, cm_g = f2g.shape[:3]
    ci_g = f1g.shape[2]
    k1, k2 = f1g.shape[3:], f2g.shape[3:]
    work = n_g * co_g * cm_g * ci_g * math.prod(k1) * math.prod(k2)
    if work < _SKETCH_MIN_WORK or (math.prod(k1) != 1 and math.prod(k2) != 1):
        return _rel_error(tw, compose_grouped(f2g, f1g))
    if math.prod(k2) == 1:
        # T[o, (i, w)] = sum_m F2[o, m] F1[m, (i, w)]
        m2 = f2g.reshape(n_g, co_g, cm_g)
        m1 = f1g.reshape(n_g, cm_g, -1)
        t = tw.reshape(n_g, co_g, -1)
    else:
        # T[(o, w), i] = sum_m F2[o, m, w] F1[m, i]
        m2 = np.moveaxis(f2g, 2, -1).reshape(n_g, -1, cm_g)
        m1 = f1g.reshape(n_g, cm_g, ci_g)
        t = np.moveaxis(tw, 2, -1).reshape(n_g, -1, ci_g)
    probes = np.random.default_rng(_SKETCH_SEED).standard_normal((n_g, t.shape[2], _SKETCH_PROBES))
    err = m2 @ (m1 @ probes) - t @ probes
    estimate = math.sqrt(float(np.vdot(err, err)) / _SKETCH_PROBES)
    norm = math.sqrt(float(np.vdot(t, t)))
    return estimate / norm if norm else estimate


def _netmorph_factors(
    gg: np.ndarray,
    target: np.ndarray,
    plan: _Plan,
    rng: np.random.Generator,
    cm_g: int,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Algorithm 1 on the supports of ``plan``: alternate exact/least-squares solves."""
    n_g, co_g, ci_g = gg.shape[:3]
    tw = target[(slice(None), slice(None), slice(None), *plan.window)]
    if plan.solve_f1:
        f2, fast = orthogonal_stack_ops(n_g, co_g, cm_g * math.prod(plan.s2), rng)
        f2 = f2.reshape(n_g, co_g, cm_g, *plan.s2)
        f1 = None
    else:
        f1t, fast = orthogonal_stack_ops(n_g, ci_g, cm_g * math.prod(plan.s1), rng)
        f1 = np.swapaxes(f1t.reshape(n_g, ci_g, cm_g, *plan.s1), 1, 2)
        f2 = None
    solve_f1 = plan.solve_f1
    residual = math.inf
    iterations = 0
    for iterations in range(1, max(1, max_iter) + 1):
        first = iterations == 1
        ops = fast if first else None
        if solve_f1:
            f1 = _solve_channel_factor(f2, tw, plan.s1, first, ops)
        else:
            x = _solve_channel_factor(
                np.swapaxes(f1, 1, 2), np.swapaxes(tw, 1, 2), plan.s2, first, ops
            )
            f2 = np.swapaxes(x, 1, 2)
        # The window covers all of G's support and the factors are zero outside it,
        # so this equals the full-size residual.
        residual = composite_residual(tw, f2, f1)
        if residual < tol:
            break
        solve_f1 = not solve_f1
    return f1, f2, residual, iterations


def _lowrank_factors(
    gg: np.ndarray, rng: np.random.Generator, cm_g: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """1x1 layer 2 whose columns span range(G): exact iff rank(G) <= cm_g per group."""
    n_g, co_g = gg.shape[:2]
    mat = gg.reshape(n_g, co_g, -1)
    u, s, _ = np.linalg.svd(mat, full_matrices=True)
    scale = float(s.max()) if s.size else 0.0
    rank = int((s > scale * max(mat.shape[1:]) * np.finfo(np.float64).eps).sum(-1).max())
    if rank > cm_g:
        return None
    # A random rotation inside the kept subspace keeps layer 2 dense.
    basis = u[:, :, :cm_g] @ orthogonal_stack(n_g, cm_g, cm_g, rng)
    f1 = np.swapaxes(basis, 1, 2) @ mat
    return f1.reshape(n_g, cm_g, *gg.shape[2:]), basis


def _identity_solution(g: np.ndarray, gg: np.ndarray, target: np.ndarray, k2: tuple[int, ...], width: int,
                       groups: int) -> DepthSolution:
    """IdMorph: F1 = g padded with zero rows, F2 a one-hot identity at tap `lo` per axis."""
    co, ci_g = g.shape[:2]
    k = tuple(g.shape[2:])
    co_g, cm_g = co // groups, width // groups
    if cm_g < co_g:
        raise ValueError(f"identity deepening needs width >= C_out ({co}) per group, got {width}")
    lo, _ = _lo_hi(k2)
    f1 = np.zeros((groups, cm_g, ci_g, *k))
    f1[:, :co_g] = gg
    f2 = np.zeros((groups, co_g, cm_g, *k2))
    f2[(slice(None), np.arange(co_g), np.arange(co_g), *lo)] = 1.0
    residual = _rel_error(target, compose_grouped(f2, f1))
    return DepthSolution(f1.reshape(width, ci_g, *k), f2.reshape(co, cm_g, *k2), residual, "identity", 1)


def _netmorph_solution(g: np.ndarray, gg: np.ndarray, target: np.ndarray, k2: tuple[int, ...], width: int,
                       groups: int, rng: np.random.Generator, max_iter: int, tol: float
                       ) -> tuple[np.ndarray, np.ndarray, float, str, int]:
    """The paper's Algorithms 1 and 2 (then the low-rank 1x1 limit): (F1, F2, residual, algorithm, iterations)."""
    co, ci_g = g.shape[:2]
    k = tuple(g.shape[2:])
    co_g, cm_g = co // groups, width // groups
    plans, min_width = choose_plans(k, k2, groups, co_g, ci_g, cm_g)
    found = None
    # One exact solve per plan, in order; alternation only if none of them is exact.
    for plan in plans:
        f1s, f2s, residual, iterations = _netmorph_factors(gg, target, plan, rng, cm_g, 1, tol)
        if residual < tol:
            found = plan, f1s, f2s, residual, iterations
            break
    if found is None and plans and max_iter > 1:
        plan = plans[0]
        f1s, f2s, residual, iterations = _netmorph_factors(gg, target, plan, rng, cm_g, max_iter, tol)
        if residual < tol:
            found = plan, f1s, f2s, residual, iterations
    if found is not None:
        plan, f1s, f2s, residual, iterations = found
        if plan.name == "alg1":
            algorithm = "alg1-exact" if iterations == 1 else "alg1-als"
        else:
            algorithm = plan.name
        return pad_support(f1s, plan.a1, k), pad_support(f2s, plan.a2, k2), residual, algorithm, iterations
    lowrank = _lowrank_factors(gg, rng, cm_g)
    if lowrank is None:
        raise ValueError(
            f"width {width} is too narrow for an exact depth morph of a {g.shape} "
            f"filter (groups={groups}, k2={k2}): need width >= {min_width * groups}"
        )
    f1, f2m = lowrank
    lo, _ = _lo_hi(k2)
    f2 = np.zeros((groups, co_g, cm_g, *k2))
    f2[(..., *lo)] = f2m
    return f1, f2, _rel_error(target, compose_grouped(f2, f1)), "alg2-lowrank", 1


def solve_deepen(
    g: np.ndarray,
    k2: Sequence[int],
    width: int,
    rng: np.random.Generator,
    *,
    groups: int = 1,
    method: str = "netmorph",
    max_iter: int = 30,
    tol: float = 1e-10,
) -> DepthSolution:
    """Split the parent filter ``g`` into layer 1 (kernel K, ``width`` outputs) and
    layer 2 (kernel ``k2``) with ``compose(f2, f1, groups) == target_kernel(g, k2)``.

    ``method="netmorph"`` (Wei et al. 2016): Algorithm 1 when the counting condition
    holds at full kernel sizes, else Algorithm 2 (shrink one factor by 2 per axis until
    it holds, then zero-pad it back centred); see :class:`DepthSolution`. The fixed
    factor is a random orthogonal matrix, so the solve is well-conditioned and both
    factors survive float32 rounding. Scales are then balanced: with
    ``s = sqrt(rms(F1) / rms(F2))`` (RMS over all entries of the returned arrays),
    ``F1 / s`` and ``F2 * s`` have equal per-element RMS, the geometric mean of the
    two. When both sides of the fixed 1x1 factor exceed 1024 it is a structured random
    orthogonal matrix (:class:`MixedDCT`), and the solve is one FFT-based transform.
    A zero ``g`` gives ``F1 = 0`` and a random orthogonal ``F2`` (RMS about
    ``1/sqrt(fan_in)``). Large explicit operators (above 4M entries) are avoided by
    taking the next exact plan, usually the 1x1 limit of Algorithm 2.

    ``method="identity"`` (IdMorph / Net2DeeperNet): ``F1 = g`` padded with zero rows,
    ``F2`` a one-hot identity at tap ``lo`` per axis; needs ``width >= C_out``.

    Raises ``ValueError`` when no exact solution exists for this width.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.ndim < 2:
        raise ValueError(f"a filter has at least 2 axes [C_out, C_in/groups], got {g.shape}")
    co, ci_g = g.shape[:2]
    k = tuple(g.shape[2:])
    k2 = as_kernel(k2, len(k), "k2")
    if groups < 1 or co % groups or width % groups or width < 1:
        raise ValueError(
            f"C_out={co} and width={width} must both be positive multiples of groups={groups}"
        )
    # With a 1x1 layer 2 the target is g itself: skip np.pad's copy (target is never written).
    target = _split_groups(g if math.prod(k2) == 1 else target_kernel(g, k2), groups)
    gg = _split_groups(g, groups)

    if method == "identity":
        return _identity_solution(g, gg, target, k2, width, groups)
    if method != "netmorph":
        raise ValueError(f"unknown method {method!r}; expected 'netmorph' or 'identity'")
    f1, f2, residual, algorithm, iterations = _netmorph_solution(g, gg, target, k2, width, groups, rng,
                                                                 max_iter, tol)
    r1, r2 = rms(f1), rms(f2)
    if r1 > 0.0 and r2 > 0.0:
        s = math.sqrt(r1 / r2)
        f1 /= s
        f2 *= s
    return DepthSolution(
        f1.reshape(width, ci_g, *k), f2.reshape(co, width // groups, *k2), residual, algorithm, iterations
    )
