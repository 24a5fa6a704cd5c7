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

__all__ = [
    "DepthSolution",
    "carry_bias",
    "compose",
    "random_orthogonal",
    "solve_deepen",
    "split_parallel",
    "split_residual",
    "target_kernel",
]

# Above this size a Householder QR costs seconds (O(n^3) at LAPACK's QR speed); a
# structured random orthogonal matrix (see _mixed_dct_orthogonal) costs O(n^2 * 64).
_QR_MAX_DIM = 1024
# Largest explicit convolution operator (in float64 entries, all groups together) that
# the multi-tap solve may build before a cheaper exact plan is preferred.
_MAX_OPERATOR_ENTRIES = 4_000_000
_MIX_BLOCK = 64
# Residual checks of more multiply-adds than this use a randomized sketch with this many
# Gaussian probes (see _composite_residual) instead of the dense composition.
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
    multiply-adds, estimated from 16 random probes (see ``_composite_residual``).
    """

    f1: np.ndarray
    f2: np.ndarray
    residual: float
    algorithm: str
    iterations: int


# --------------------------------------------------------------------------- helpers


def _as_kernel(k: Sequence[int], nd: int, what: str) -> tuple[int, ...]:
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


def _rms(a: np.ndarray) -> float:
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


def _pad_support(
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


def _idct_rows(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``D.T @ u`` along axis 0, ``D`` the orthonormal n x n DCT-II matrix (so this is the
    orthonormal DCT-III), via one inverse real FFT of length n and Makhoul's reordering.

    ``D.T @ u = x`` has ``x[2p] = v[p]`` and ``x[2p + 1] = v[n - 1 - p]`` where ``v`` is the
    inverse real FFT of ``V[m] = (u[m] - i u[n - m]) exp(i pi m / 2n) / s_m`` (``u[n] = 0``),
    ``s_m`` the row scale of ``D``: a real ``v`` has ``V[n - m] = conj(V[m])``, which is why
    coefficient ``n - m`` enters as the imaginary part. ``out`` (float64, not ``u``) may
    receive the result.
    """
    n = u.shape[0]
    h = n // 2 + 1
    shape = (h,) + (1,) * (u.ndim - 1)
    z = np.empty((h,) + u.shape[1:], dtype=np.complex128)
    z.real = u[:h]
    z.imag[0] = 0.0
    z.imag[1:] = u[n - 1 : n - h : -1]
    z.imag[1:] *= -1.0
    z.real[0] *= math.sqrt(2.0)
    z *= (math.sqrt(n / 2.0) * np.exp(0.5j * np.pi * np.arange(h) / n)).reshape(shape)
    v = np.fft.irfft(z, n, axis=0)
    del z
    half = (n + 1) // 2
    x = np.empty(u.shape) if out is None else out
    x[::2] = v[:half]
    x[1::2] = v[half:][::-1]
    return x


class _BlockDiagonal:
    """Block-diagonal Haar-random orthogonal matrix: blocks of 64, plus a remainder block.

    Products are batched as 64 x 64 x 64 pieces: OpenBLAS runs pieces that small on one
    thread, several times faster on a busy 2-core machine than the threaded 64 x 64 x n
    calls of a block-by-block loop, with the same result.
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        nb, rem = divmod(n, _MIX_BLOCK)
        self.full = _haar_stack(nb, _MIX_BLOCK, _MIX_BLOCK, rng) if nb else None
        self.rem = _haar_stack(1, rem, rem, rng)[0] if rem else None
        self.main = nb * _MIX_BLOCK

    def left(self, x: np.ndarray, transpose: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """``B @ x`` (or ``B.T @ x``) for a 2-D ``x``, into ``out`` (C-contiguous, not ``x``) if given."""
        m = x.shape[1]
        out = np.empty(x.shape) if out is None else out
        if self.full is not None:
            a = np.swapaxes(self.full, 1, 2) if transpose else self.full
            nb, b, main = a.shape[0], _MIX_BLOCK, self.main
            mc = m - m % b
            if mc:
                def pieces(v: np.ndarray) -> np.ndarray:
                    return v[:main].reshape(nb, b, m)[:, :, :mc].reshape(nb, b, mc // b, b).swapaxes(1, 2)

                np.matmul(a[:, None], pieces(x), out=pieces(out))
            if mc < m:
                np.matmul(a, x[:main, mc:].reshape(nb, b, m - mc), out=out[:main, mc:].reshape(nb, b, m - mc))
        if self.rem is not None:
            out[self.main :] = (self.rem.T if transpose else self.rem) @ x[self.main :]
        return out

    def right(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x @ B`` for a 2-D ``x``, into ``out`` (C-contiguous, not ``x``) if given."""
        m = x.shape[0]
        out = np.empty(x.shape) if out is None else out
        if self.full is not None:
            nb, b, main = self.full.shape[0], _MIX_BLOCK, self.main
            mc = m - m % b
            if mc:
                def pieces(v: np.ndarray) -> np.ndarray:
                    return v[:mc, :main].reshape(mc // b, b, nb, b).transpose(2, 0, 1, 3)

                np.matmul(pieces(x), self.full[:, None], out=pieces(out))
            if mc < m:
                def tail(v: np.ndarray) -> np.ndarray:
                    return v[mc:, :main].reshape(m - mc, nb, b).swapaxes(0, 1)

                np.matmul(tail(x), self.full, out=tail(out))
        if self.rem is not None:
            out[:, self.main :] = x[:, self.main :] @ self.rem
        return out


class _MixedDCT:
    """Random orthogonal ``Q = L @ D[k][:, j] @ R`` and its fast application.

    ``D`` is the orthonormal n x n DCT-II matrix, ``k`` and ``j`` random permutations of
    its rows and columns, ``L`` and ``R`` block-diagonal with Haar-random orthogonal
    blocks of 64 (plus a remainder). :meth:`dense` builds ``Q`` in O(n^2 * 64); every
    entry is a random combination of thousands of cosines, so ``Q`` is dense and
    unstructured enough for an initialisation, and orthogonal to rounding level.
    :meth:`apply_t` multiplies by ``Q.T`` through the FFT in O(n^2 log n) instead of a
    dense O(n^3) product.
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n = n
        self.rows = rng.permutation(n)
        self.cols = rng.permutation(n)
        self.left = _BlockDiagonal(n, rng)
        self.right = _BlockDiagonal(n, rng)

    def dense(self) -> np.ndarray:
        n = self.n
        itype = np.int32 if 4 * n * n < 2**31 else np.int64
        k = self.rows.astype(itype)[:, None]
        j = self.cols.astype(itype)[None, :]
        # The integer phase modulo the period indexes a table of 4n cosines: exact small
        # arguments, and n^2 lookups instead of n^2 cos() calls.
        table = np.cos(np.pi * np.arange(4 * n) / (2.0 * n)) * math.sqrt(2.0 / n)
        phase = (2 * j + 1) * k
        np.remainder(phase, 4 * n, out=phase)
        c = np.take(table, phase)
        del phase
        c[k[:, 0] == 0] *= math.sqrt(0.5)  # the DC row of the orthonormal DCT-II
        # Fresh n^2 buffers cost page faults (the kernel zeroes them): c is reused.
        return self.right.right(self.left.left(c), out=c)

    def apply_t(self, x: np.ndarray) -> np.ndarray:
        """``Q.T @ x`` for ``x`` of shape ``[n, ...]``."""
        # Two n^2 buffers take turns (fresh ones cost page faults, the kernel zeroes them).
        a = self.left.left(x.reshape(self.n, -1), transpose=True)
        b = np.empty_like(a)
        b[self.rows] = a
        _idct_rows(b, out=a)
        np.take(a, self.cols, axis=0, out=b, mode="clip")
        return self.right.left(b, transpose=True, out=a).reshape(x.shape)


def _mixed_dct_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Dense random n x n orthogonal matrix in O(n^2 * 64) instead of O(n^3) (see :class:`_MixedDCT`)."""
    return _MixedDCT(n, rng).dense()


def _haar_stack(n: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Haar-distributed matrices with orthonormal rows (rows <= cols) or columns."""
    tall = rows >= cols
    shape = (n, rows, cols) if tall else (n, cols, rows)
    q, r = np.linalg.qr(rng.standard_normal(shape))
    # Fixing the signs of diag(R) makes the distribution exactly Haar.
    d = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    d[d == 0] = 1.0
    q = q * d[:, None, :]
    return q if tall else np.swapaxes(q, -1, -2)


def _orthogonal_stack(n: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    return _orthogonal_stack_ops(n, rows, cols, rng)[0]


def _orthogonal_stack_ops(
    n: int, rows: int, cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[_MixedDCT] | None]:
    """``n`` random ``rows x cols`` matrices with orthonormal rows or columns, and, for the
    structured ones (both sides above 1024), the fast operators whose leading block they are.
    """
    if min(rows, cols) <= _QR_MAX_DIM:
        return _haar_stack(n, rows, cols, rng), None
    ops = [_MixedDCT(max(rows, cols), rng) for _ in range(n)]
    mats = [op.dense()[:rows, :cols] for op in ops]
    stack = np.ascontiguousarray(mats[0][None]) if n == 1 else np.stack(mats)
    return stack, ops


def random_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random matrix with orthonormal rows (``rows <= cols``) or orthonormal columns.

    QR of a Gaussian matrix with the sign fix that makes it Haar-distributed. When both
    sides exceed 1024 a structured random orthogonal matrix (randomly permuted DCT mixed
    by Haar blocks of 64) is returned instead: equally dense and orthonormal, but
    O(n^2) to build where the QR of a 4096 x 4096 Gaussian takes seconds.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"random_orthogonal needs a positive shape, got {rows} x {cols}")
    return _orthogonal_stack(1, rows, cols, rng)[0]


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
    k2 = _as_kernel(k2, g.ndim - 2, "k2")
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


def _choose_plans(
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
    fast: list[_MixedDCT] | None = None,
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


def _compose_grouped(f2g: np.ndarray, f1g: np.ndarray) -> np.ndarray:
    n = f2g.shape[0]
    flat = compose(
        f2g.reshape(-1, *f2g.shape[2:]), f1g.reshape(-1, *f1g.shape[2:]), groups=n
    )
    return flat.reshape(n, f2g.shape[1], *flat.shape[1:])


def _composite_residual(tw: np.ndarray, f2g: np.ndarray, f1g: np.ndarray) -> float:
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
        return _rel_error(tw, _compose_grouped(f2g, f1g))
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
        f2, fast = _orthogonal_stack_ops(n_g, co_g, cm_g * math.prod(plan.s2), rng)
        f2 = f2.reshape(n_g, co_g, cm_g, *plan.s2)
        f1 = None
    else:
        f1t, fast = _orthogonal_stack_ops(n_g, ci_g, cm_g * math.prod(plan.s1), rng)
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
        residual = _composite_residual(tw, f2, f1)
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
    basis = u[:, :, :cm_g] @ _orthogonal_stack(n_g, cm_g, cm_g, rng)
    f1 = np.swapaxes(basis, 1, 2) @ mat
    return f1.reshape(n_g, cm_g, *gg.shape[2:]), basis


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
    orthogonal matrix (:class:`_MixedDCT`), and the solve is one FFT-based transform.
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
    k2 = _as_kernel(k2, len(k), "k2")
    if groups < 1 or co % groups or width % groups or width < 1:
        raise ValueError(
            f"C_out={co} and width={width} must both be positive multiples of groups={groups}"
        )
    co_g, cm_g = co // groups, width // groups
    lo, _ = _lo_hi(k2)
    # With a 1x1 layer 2 the target is g itself: skip np.pad's copy (target is never written).
    target = _split_groups(g if math.prod(k2) == 1 else target_kernel(g, k2), groups)
    gg = _split_groups(g, groups)

    if method == "identity":
        if cm_g < co_g:
            raise ValueError(
                f"identity deepening needs width >= C_out ({co}) per group, got {width}"
            )
        f1 = np.zeros((groups, cm_g, ci_g, *k))
        f1[:, :co_g] = gg
        f2 = np.zeros((groups, co_g, cm_g, *k2))
        f2[(slice(None), np.arange(co_g), np.arange(co_g), *lo)] = 1.0
        residual = _rel_error(target, _compose_grouped(f2, f1))
        return DepthSolution(
            f1.reshape(width, ci_g, *k), f2.reshape(co, cm_g, *k2), residual, "identity", 1
        )
    if method != "netmorph":
        raise ValueError(f"unknown method {method!r}; expected 'netmorph' or 'identity'")

    plans, min_width = _choose_plans(k, k2, groups, co_g, ci_g, cm_g)
    found = None
    # One exact solve per plan, in order; alternation only if none of them is exact.
    for plan in plans:
        f1s, f2s, residual, iterations = _netmorph_factors(gg, target, plan, rng, cm_g, 1, tol)
        if residual < tol:
            found = plan, f1s, f2s, residual, iterations
            break
    if found is None and plans and max_iter > 1:
        plan = plans[0]
        f1s, f2s, residual, iterations = _netmorph_factors(
            gg, target, plan, rng, cm_g, max_iter, tol
        )
        if residual < tol:
            found = plan, f1s, f2s, residual, iterations
    if found is not None:
        plan, f1s, f2s, residual, iterations = found
        f1 = _pad_support(f1s, plan.a1, k)
        f2 = _pad_support(f2s, plan.a2, k2)
        if plan.name == "alg1":
            algorithm = "alg1-exact" if iterations == 1 else "alg1-als"
        else:
            algorithm = plan.name
    else:
        lowrank = _lowrank_factors(gg, rng, cm_g)
        if lowrank is None:
            raise ValueError(
                f"width {width} is too narrow for an exact depth morph of a {g.shape} "
                f"filter (groups={groups}, k2={k2}): need width >= {min_width * groups}"
            )
        f1, f2m = lowrank
        f2 = np.zeros((groups, co_g, cm_g, *k2))
        f2[(..., *lo)] = f2m
        residual = _rel_error(target, _compose_grouped(f2, f1))
        algorithm, iterations = "alg2-lowrank", 1

    r1, r2 = _rms(f1), _rms(f2)
    if r1 > 0.0 and r2 > 0.0:
        s = math.sqrt(r1 / r2)
        f1 /= s
        f2 *= s
    return DepthSolution(
        f1.reshape(width, ci_g, *k), f2.reshape(co, cm_g, *k2), residual, algorithm, iterations
    )


# ------------------------------------------------------------ parallel / residual


def split_parallel(
    g: np.ndarray, kernels: Sequence[Sequence[int]], rng: np.random.Generator
) -> list[np.ndarray]:
    """Branch filters (one per entry of ``kernels``) whose centred sum is exactly ``g``.

    A branch of kernel ``k`` sits inside ``g``'s kernel ``K`` at offset ``off = (K - k) // 2``
    per axis, so its conv takes the parent's pads reduced to ``P_begin - off`` and
    ``P_end - (K - k - off)`` (times the dilation). All
    branches but one are random with ``g``'s per-element RMS; the remainder is the last
    branch having the largest kernel. If that kernel is smaller than ``K``, ``g`` must
    vanish outside it. Channels and groups are those of ``g``.
    """
    g = np.asarray(g, dtype=np.float64)
    k = tuple(g.shape[2:])
    if not kernels:
        raise ValueError("split_parallel needs at least one branch kernel")
    ks = [_as_kernel(kk, len(k), f"branch kernel {n}") for n, kk in enumerate(kernels)]
    for n, kk in enumerate(ks):
        if any(a > b for a, b in zip(kk, k)):
            raise ValueError(f"branch kernel {n} {kk} is larger than the parent kernel {k}")
    biggest = tuple(max(kk[d] for kk in ks) for d in range(len(k)))
    holders = [n for n, kk in enumerate(ks) if kk == biggest]
    if not holders:
        raise ValueError(
            f"no branch kernel contains all others {ks}: the remainder branch must have "
            f"the largest kernel on every axis"
        )
    rem = holders[-1]
    offsets = [tuple((a - b) // 2 for a, b in zip(k, kk)) for kk in ks]
    scale = _rms(g)
    if scale == 0.0:
        scale = 1.0 / math.sqrt(max(1, math.prod(g.shape[1:])))
    branches: list[np.ndarray | None] = [None] * len(ks)
    remainder = g.copy()
    for n, kk in enumerate(ks):
        if n == rem:
            continue
        b = rng.standard_normal((*g.shape[:2], *kk)) * scale
        branches[n] = b
        remainder -= _pad_support(b, offsets[n], k)
    window = (slice(None), slice(None), *(slice(o, o + s) for o, s in zip(offsets[rem], ks[rem])))
    inside = remainder[window].copy()
    remainder[window] = 0.0
    if remainder.any():
        raise ValueError(
            f"the largest branch kernel {ks[rem]} is smaller than the parent kernel {k} "
            f"and the parent filter is non-zero outside it: give one branch kernel {k}"
        )
    branches[rem] = inside
    return [b for b in branches if b is not None]


def split_residual(
    g: np.ndarray,
    k_branch: Sequence[int],
    width: int,
    rng: np.random.Generator,
    *,
    groups: int = 1,
    branch_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual module (Modularized Morphing): ``target_kernel(g, k_branch) == M + F2 (*) F1``.

    Returns ``(main, branch_f1, branch_f2)``. The branch is layer 1 with ``g``'s kernel K
    and ``width`` outputs, then layer 2 with kernel ``k_branch``; both dense random
    (orthogonal, balanced RMS) and scaled so that the branch carries ``branch_fraction``
    of ``g``'s norm. ``main`` is the dense remainder with kernel ``K + k_branch - 1`` and
    ``g``'s channels; its conv takes the same pads as the branch's layer 1
    (``P + lo`` / ``P + hi``). A P-activation with slope 1 may sit inside the branch.
    """
    g = np.asarray(g, dtype=np.float64)
    co, ci_g = g.shape[:2]
    k = tuple(g.shape[2:])
    k_branch = _as_kernel(k_branch, len(k), "k_branch")
    if groups < 1 or co % groups or width % groups or width < 1:
        raise ValueError(
            f"C_out={co} and width={width} must both be positive multiples of groups={groups}"
        )
    if not 0.0 < branch_fraction:
        raise ValueError(f"branch_fraction must be positive, got {branch_fraction}")
    cm_g = width // groups
    f1 = _orthogonal_stack(groups, cm_g, ci_g * math.prod(k), rng)
    f1 = f1.reshape(width, ci_g, *k)
    f2 = _orthogonal_stack(groups, co // groups, cm_g * math.prod(k_branch), rng)
    f2 = f2.reshape(co, cm_g, *k_branch)
    target = target_kernel(g, k_branch)
    path = compose(f2, f1, groups)
    gnorm = float(np.linalg.norm(g))
    if gnorm > 0.0:
        # Scale the branch so its composite has the requested share of g's norm, then
        # split that scale between the two layers so their per-element RMS match.
        gain = branch_fraction * gnorm / float(np.linalg.norm(path))
        s = math.sqrt(gain * _rms(f2) / _rms(f1))
        f1 = f1 * s
        f2 = f2 * (gain / s)
        path = compose(f2, f1, groups)
    return target - path, f1, f2
