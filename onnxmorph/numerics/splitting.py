"""Splits of one filter into several that sum or compose to it: parallel branches, residual modules, chains.

Pure numpy, like `solvers` (whose conventions hold here): the subnet morph installs what these
return. Every split is exact by construction; `chain_filters` checks each depth split's residual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from onnxmorph.numerics.geometry import centred_offsets
from onnxmorph.numerics.orthogonal import orthogonal_stack
from onnxmorph.numerics.solvers import as_kernel, compose, pad_support, rms, solve_deepen, target_kernel

# Share of the parent filter's norm that a new residual branch carries at morph time.
BRANCH_FRACTION = 0.5
# Relative error of a solved split above which the morph is refused instead of written.
MAX_SPLIT_ERROR = 1e-6


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
    ks = [as_kernel(kk, len(k), f"branch kernel {n}") for n, kk in enumerate(kernels)]
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
    scale = rms(g)
    if scale == 0.0:
        scale = 1.0 / math.sqrt(max(1, math.prod(g.shape[1:])))
    branches: list[np.ndarray | None] = [None] * len(ks)
    remainder = g.copy()
    for n, kk in enumerate(ks):
        if n == rem:
            continue
        b = rng.standard_normal((*g.shape[:2], *kk)) * scale
        branches[n] = b
        remainder -= pad_support(b, offsets[n], k)
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


def _branch(g: np.ndarray, k1: Sequence[int], k2: Sequence[int], width: int, rng: np.random.Generator,
            groups: int, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-layer branch (kernels `k1` then `k2`, `width` channels between) carrying `fraction` of g's norm.

    Both layers are dense random orthogonal with equal per-element RMS. Returns (F1, F2, their
    composition).
    """
    co, ci_g = g.shape[:2]
    if groups < 1 or co % groups or width % groups or width < 1:
        raise ValueError(f"C_out={co} and width={width} must both be positive multiples of groups={groups}")
    if not 0.0 < fraction:
        raise ValueError(f"branch_fraction must be positive, got {fraction}")
    cm_g = width // groups
    f1 = orthogonal_stack(groups, cm_g, ci_g * math.prod(k1), rng).reshape(width, ci_g, *k1)
    f2 = orthogonal_stack(groups, co // groups, cm_g * math.prod(k2), rng).reshape(co, cm_g, *k2)
    path = compose(f2, f1, groups)
    gnorm, pnorm = float(np.linalg.norm(g)), float(np.linalg.norm(path))
    if gnorm > 0.0 and pnorm > 0.0:
        # the composite gets the requested share of g's norm, split between the two layers
        gain = fraction * gnorm / pnorm
        s = math.sqrt(gain * rms(f2) / rms(f1))
        f1, f2 = f1 * s, f2 * (gain / s)
        path = compose(f2, f1, groups)
    return f1, f2, path


def split_residual(
    g: np.ndarray,
    k_branch: Sequence[int],
    width: int,
    rng: np.random.Generator,
    *,
    groups: int = 1,
    branch_fraction: float = BRANCH_FRACTION,
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
    k = tuple(g.shape[2:])
    k_branch = as_kernel(k_branch, len(k), "k_branch")
    f1, f2, path = _branch(g, k, k_branch, width, rng, groups, branch_fraction)
    return target_kernel(g, k_branch) - path, f1, f2


def split_residual_centred(g: np.ndarray, k1: Sequence[int], width: int, rng: np.random.Generator,
                           groups: int = 1, fraction: float = BRANCH_FRACTION
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`g == M + centred(F2 (*) F1)` with F1 of kernel `k1` (centred in g's kernel), F2 1x1.

    Returns (M, F1, F2): F1 `[width, Ci/groups, *k1]` and F2 `[Co, width/groups, 1...]` as in
    `split_residual`; M (g's kernel and channels) is the dense remainder.
    """
    g = np.asarray(g, dtype=np.float64)
    k = tuple(g.shape[2:])
    k1 = tuple(k1)
    f1, f2, path = _branch(g, k1, (1,) * len(k), width, rng, groups, fraction)
    main = g.copy()
    window = (slice(None), slice(None), *(slice(o, o + s) for o, s in zip(centred_offsets(k, k1), k1)))
    main[window] -= path
    return main, f1, f2


def chain_filters(g: np.ndarray, depth: int, k2: Sequence[int], width: int, rng: np.random.Generator,
                  groups: int = 1) -> list[np.ndarray]:
    """`depth` filters (first one with g's kernel, the others `k2`) whose chained composition is `g`.

    Repeated NetMorph depth splits: g = F2 (*) F1, then F2 = F3 (*) F2', ... The first filter
    has `width` outputs, the middle ones `width` in and out, the last g's outputs.
    """
    filters: list[np.ndarray] = []
    rest = np.asarray(g, dtype=np.float64)
    for _ in range(depth - 1):
        solution = solve_deepen(rest, k2, width, rng, groups=groups)
        if solution.residual > MAX_SPLIT_ERROR:
            raise ValueError(f"the depth split is not exact (relative error {solution.residual:.1e})")
        filters.append(solution.f1)
        rest = solution.f2
    filters.append(rest)
    return filters
