"""Pure-numpy weight solvers of the width morph: new incoming filters, new outgoing weights, replication.

A widened channel axis is described by where the old channels sit in an array axis (`offset`,
each channel owning `block` consecutive entries, e.g. H*W columns after a Flatten) and by the
insertions `(pos, count)`: `count` new channels placed after old channel `pos - 1`. `sources`
lists, per new channel in insertion order, the old channel it copies (replication) or -1.

Every solver writes its result once, into an array of the weight's dtype (float32, float16,
bfloat16 or float64), a slab at a time: the slab (at most `CHUNK_BYTES` of the widened weight,
every entry of the widened axis in it) is read from the parent's weight, computed in `compute
dtype` (float32 for the 16-bit types, the weight's own otherwise) and stored. Nothing of the
weight's size is made besides the result, so a weight that is mapped from its file is read once
and the work memory of a morph is its largest new weight plus a slab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from onnxmorph.numerics.dtypes import compute_dtype

Insertions = Sequence[tuple[int, int]]

METHODS = ("netmorph", "net2net", "lemon")

# The entries of one slab: a few of them fit in a CPU cache's neighbourhood, and they bound the
# work arrays of a solver whatever the size of the weight.
CHUNK_BYTES = 16 * 2**20


def _take(array: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    return np.take(array, index, axis=axis)


def channel_index(offset: int, block: int, channels: Sequence[int]) -> np.ndarray:
    """Array indices (along the axis) of `channels`, each expanded to its `block` entries."""
    channels = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
    return (offset + channels * block + np.arange(block)).reshape(-1)


def new_count(inserts: Insertions) -> int:
    return int(sum(count for _, count in inserts))


# --------------------------------------------------------------------------- the layout of a widened axis


class _Layout:
    """Where the old entries and the new ones go along a widened axis of `length` entries.

    `runs` are (old start, old stop, new start) of the old entries kept in one piece; `pieces`
    are (first new entry, entry count, start in the result) of each insertion, in insertion
    order. Insertions at the same place go in reverse order (as inserting them one by one, the
    first last, places them).
    """

    def __init__(self, length: int, offset: int, block: int, inserts: Insertions) -> None:
        places = []
        first = 0
        for k, (pos, count) in enumerate(inserts):
            at = offset + int(pos) * block
            if not 0 <= at <= length:
                raise ValueError(f"insertion at {at} outside an axis of {length} entries")
            places.append((at, -k, first, int(count) * block))
            first += int(count) * block
        self.added = first
        self.length = length + first
        self.pieces: list[tuple[int, int, int]] = [(0, 0, 0)] * len(places)
        self.runs: list[tuple[int, int, int]] = []
        cursor = 0  # next old entry
        shift = 0  # new entries placed so far
        for at, neg_k, start, size in sorted(places):
            if at > cursor:
                self.runs.append((cursor, at, cursor + shift))
                cursor = at
            self.pieces[-neg_k] = (start, size, at + shift)
            shift += size
        if cursor < length:
            self.runs.append((cursor, length, cursor + shift))

    def contiguous(self, old: int) -> bool:
        """Whether the old entries come first, in one run, and the new ones after them in insertion order."""
        if self.runs not in ([(0, old, 0)], []) or (not self.runs and old):
            return False
        return all(at == old + start for start, _, at in self.pieces)

    def place(self, out: np.ndarray, old: np.ndarray | None, new: np.ndarray | None) -> None:
        """Write `old` (every old entry, axis first) and `new` (the new entries in insertion order) into `out`."""
        if old is not None:
            for a, b, at in self.runs:
                out[at:at + b - a] = old[a:b]
        if new is not None:
            for start, size, at in self.pieces:
                out[at:at + size] = new[start:start + size]


def _slabs(shape: Sequence[int], axis: int, itemsize: int) -> tuple[int | None, Iterator[slice]]:
    """(the axis cut into slabs, or None for one slab; the slabs): the longest axis but `axis`."""
    others = [k for k in range(len(shape)) if k != axis]
    if not others:
        return None, iter([slice(None)])
    cut = max(others, key=lambda k: shape[k])
    total = int(np.prod(shape, dtype=np.int64)) * itemsize
    per = max(1, int(shape[cut] * CHUNK_BYTES // max(total, 1)))
    return cut, (slice(k, min(k + per, shape[cut])) for k in range(0, max(shape[cut], 1), per))


Solver = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _grow(w: np.ndarray, axis: int, layout: _Layout, solve: Solver, *, exact_copy: bool = False) -> np.ndarray:
    """The widened weight, slab by slab: `solve(slab, old entries, new entries)` fills the two.

    Slabs have the widened axis first and are in the compute dtype (in the weight's own with
    `exact_copy`, for solvers that only move entries); the two it fills are in the weight's dtype,
    and are the result's own entries where the new ones all follow the old ones (a widened
    layer's usual case), else slabs placed afterwards.
    """
    ax = axis % w.ndim
    old_length = w.shape[ax]
    shape = list(w.shape)
    shape[ax] = layout.length
    out = np.empty(shape, dtype=w.dtype)
    work = w.dtype if exact_copy else compute_dtype(w.dtype)
    direct = layout.contiguous(old_length)
    cut, slabs = _slabs(w.shape, ax, max(work.itemsize, w.dtype.itemsize))
    for part in slabs:
        index = [slice(None)] * w.ndim
        if cut is not None:
            index[cut] = part
        source = np.moveaxis(w[tuple(index)], ax, 0)
        slab = source if source.dtype == work else source.astype(work)
        target = np.moveaxis(out[tuple(index)], ax, 0)
        if direct:
            solve(slab, target[:old_length], target[old_length:])
        else:
            old = np.empty(slab.shape, dtype=w.dtype)
            new = np.empty((layout.added, *slab.shape[1:]), dtype=w.dtype)
            solve(slab, old, new)
            layout.place(target, old, new)
            del old, new
        del slab, source
    return out


def _stats(w: np.ndarray) -> tuple[float, float, int]:
    """(mean, variance, count) of every entry of `w`, in float64 accumulators, a slab at a time."""
    count, mean, m2 = 0, 0.0, 0.0
    flat = w.reshape(-1) if w.flags.c_contiguous else None
    step = max(1, CHUNK_BYTES // max(w.dtype.itemsize, 1))
    parts = (flat[k:k + step] for k in range(0, flat.size, step)) if flat is not None else iter([w])
    for part in parts:
        n = part.size
        if not n:
            continue
        m = float(np.mean(part, dtype=np.float64))
        v = float(np.var(part, dtype=np.float64))
        delta = m - mean
        total = count + n
        mean += delta * n / total
        m2 += v * n + delta * delta * count * n / total
        count = total
    return mean, (m2 / count if count else 0.0), count


def _scale(array: np.ndarray, fallback_fan_in: int) -> float:
    std = float(np.sqrt(_stats(array)[1])) if array.size else 0.0
    if not np.isfinite(std) or std == 0.0:
        std = float(np.sqrt(2.0 / max(fallback_fan_in, 1)))
    return std


def _normal(rng: np.random.Generator, std: float, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Normal values of `std` in `dtype` (float32 draws for the 16-bit and 32-bit types, no float64 copy)."""
    if dtype == np.float64:
        return rng.normal(0.0, std, size=tuple(shape))
    values = rng.standard_normal(tuple(shape), dtype=np.float32)
    values *= np.float32(std)
    return values.astype(dtype, copy=False)


def _gathered(slab: np.ndarray, offset: int, block: int, sources: np.ndarray, old: int | None,
              out: np.ndarray | None = None) -> np.ndarray:
    """The entries (axis first) of new channels that copy `sources`: -1 the mean of the `old` channels, -2 zero."""
    sources = np.asarray(sources, dtype=np.int64)
    index = channel_index(offset, block, np.maximum(sources, 0))
    if out is None:
        out = slab[index]
    elif out.dtype == slab.dtype:
        np.take(slab, index, axis=0, out=out)
    else:
        out[...] = slab[index]
    if (sources == -2).any():
        out[np.repeat(sources == -2, block)] = 0
    if (sources == -1).any():
        if old is None:
            raise ValueError("a mean channel needs the number of old channels")
        entries = slab[offset:offset + old * block]
        mean = entries.reshape(old, block, *entries.shape[1:]).mean(axis=0, dtype=np.float64)
        for i in np.nonzero(sources == -1)[0]:
            out[i * block:(i + 1) * block] = mean
    return out


# --------------------------------------------------------------------------- public solvers


def insert_channels(array: np.ndarray, axis: int, offset: int, block: int, inserts: Insertions,
                    new: np.ndarray) -> np.ndarray:
    """`array` with `new` (its `axis` holding sum(count) * block entries, in insertion order) inserted.

    Insertion `(pos, count)` goes at index `offset + pos * block`; every position refers to the
    old layout.
    """
    ax = axis % array.ndim
    layout = _Layout(array.shape[ax], offset, block, inserts)
    if layout.added != new.shape[ax]:
        raise ValueError(f"expected {layout.added} new entries along axis {ax}, got {new.shape[ax]}")
    shape = list(array.shape)
    shape[ax] = layout.length
    out = np.empty(shape, dtype=array.dtype)
    target = np.moveaxis(out, ax, 0)
    layout.place(target, np.moveaxis(array, ax, 0), np.moveaxis(new, ax, 0))
    return out


def source_entries(array: np.ndarray, axis: int, offset: int, block: int, sources: Sequence[int],
                   old: int | None = None) -> np.ndarray:
    """The entries along `axis` of new channels that copy `sources`; a source of -1 is the mean of the `old`
    channels, -2 is zero (average expansion: a new channel that carries a stream's mean, or nothing)."""
    ax = axis % array.ndim
    picked = _gathered(np.moveaxis(array, ax, 0), offset, block, np.asarray(sources), old)
    return np.moveaxis(picked, 0, ax)


def average_sources(old: int, added: int, rng: np.random.Generator, extra: int = -1) -> np.ndarray:
    """Average expansion to `old + added` channels: whole copies of every channel, then `extra` channels (-1: the
    mean, -2: zero)."""
    copies = added // old
    whole = [rng.permutation(old) for _ in range(copies)]
    return np.concatenate(whole + [np.full(added - copies * old, extra)]).astype(np.int64)


def replication_sources(old: int, inserts: Insertions, rng: np.random.Generator,
                        groups: int = 1) -> np.ndarray:
    """For each new channel, a random old channel it copies: every old channel at most once while
    possible (Net2Net's random mapping), and always from the same group as its insertion point.
    """
    per_group = old // groups
    sources = []
    used: dict[int, list[int]] = {}
    for pos, count in inserts:
        g = min(max(pos - 1, 0) // per_group, groups - 1)
        pool = used.setdefault(g, [])
        for _ in range(count):
            if not pool:
                pool.extend((g * per_group + rng.permutation(per_group)).tolist())
            sources.append(pool.pop())
    return np.asarray(sources, dtype=np.int64)


def ungroup_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """The dense (group 1) weight `[Co, Ci, *k]` computing what grouped Conv weight `w` computes.

    Block-diagonal: output channels of group q read only input channels of group q, the rest is 0.
    """
    co, per_in = w.shape[:2]
    if groups < 1 or co % groups:
        raise ValueError(f"{co} output channels do not split into {groups} groups")
    per_out = co // groups
    dense = np.zeros((co, per_in * groups, *w.shape[2:]), dtype=w.dtype)
    for q in range(groups):
        dense[q * per_out:(q + 1) * per_out, q * per_in:(q + 1) * per_in] = w[q * per_out:(q + 1) * per_out]
    return dense


def solve_widen_incoming(w: np.ndarray, axis: int, inserts: Insertions, rng: np.random.Generator, *,
                         mode: str, sources: np.ndarray | None = None, offset: int = 0,
                         block: int = 1, zero_first: int = 0, old: int | None = None) -> np.ndarray:
    """New filters of a widened producer along `axis` (output channels), in `w`'s dtype.

    mode `random`: Gaussian with the std of the existing filters (netmorph), except the first
    `zero_first` new channels, whose filters are 0 (an LRN downstream needs the new channels its
    old channels' windows reach to be exactly 0); `copy`: copies of `sources`.
    Per-channel parameters (bias, BN statistics) use the same call with their own mode.
    """
    ax = axis % w.ndim
    layout = _Layout(w.shape[ax], offset, block, inserts)
    n = layout.added
    if mode == "copy":
        def copy(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
            old_out[...] = slab
            _gathered(slab, offset, block, sources, old, new_out)

        return _grow(w, ax, layout, copy, exact_copy=not (np.asarray(sources) == -1).any())
    if mode != "random":
        raise ValueError(f"unknown incoming mode {mode!r}")
    shape = list(w.shape)
    shape[ax] = n
    std = _scale(w, int(np.prod(shape)) // max(n, 1))

    def random(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
        old_out[...] = slab
        new_out[...] = _normal(rng, std, new_out.shape, new_out.dtype)
        new_out[:zero_first * block] = 0

    return _grow(w, ax, layout, random, exact_copy=True)


def fill_channels(p: np.ndarray, axis: int, inserts: Insertions, value: float, *, sources: np.ndarray | None = None,
                  offset: int = 0, block: int = 1, old: int | None = None) -> np.ndarray:
    """A per-channel parameter extended with `value` (or, with `sources`, with the copied channels' values)."""
    if sources is not None:
        return solve_widen_incoming(p, axis, inserts, np.random.default_rng(0), mode="copy", sources=sources,
                                    offset=offset, block=block, old=old)
    ax = axis % p.ndim

    def constant(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
        old_out[...] = slab
        new_out[...] = value

    return _grow(p, ax, _Layout(p.shape[ax], offset, block, inserts), constant, exact_copy=True)


def solve_widen_outgoing(w: np.ndarray, axis: int, inserts: Insertions, rng: np.random.Generator, *,
                         method: str, sources: np.ndarray | None = None, offset: int = 0, block: int = 1,
                         noise: float = 0.0, random_first: int = 0) -> np.ndarray:
    """Consumer weights on the widened input axis `axis`, chosen so the consumer's output is unchanged.

    netmorph: new entries zero, except those of the first `random_first` new channels, which are
    random (exact only because those channels are exactly 0: they then still get gradients).
    net2net: each old channel and its copies share its weight equally; `noise`
    adds a compensated perturbation (the copies' perturbations are subtracted from the original).
    lemon: the copies get random weights and the original the remainder, so the sum is unchanged.
    The result has `w`'s dtype; the division and the corrections are done in its compute dtype.
    """
    ax = axis % w.ndim
    layout = _Layout(w.shape[ax], offset, block, inserts)
    n = layout.added
    if method == "netmorph":
        std = _scale(w, w.shape[ax]) if random_first else 0.0

        def zero(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
            old_out[...] = slab
            new_out[...] = 0
            if random_first:
                live = new_out[:random_first * block]
                live[...] = _normal(rng, std, live.shape, live.dtype)

        return _grow(w, ax, layout, zero, exact_copy=True)
    if method not in ("net2net", "lemon"):
        raise ValueError(f"unknown method {method!r}")
    sources = np.asarray(sources, dtype=np.int64)
    # mean channels (source -1, average expansion) are read with weight 0; copies share their original's weight
    live = np.repeat(sources >= 0, block)
    src_index = channel_index(offset, block, np.maximum(sources, 0))
    counts = np.ones(w.shape[ax], dtype=np.int64)
    np.add.at(counts, src_index[live], 1)
    shared = bool((counts > 1).any())
    std = _scale(w, w.shape[ax]) if method == "lemon" or noise > 0.0 else 0.0
    noisy = method == "net2net" and noise > 0.0 and bool(live.any())

    def split(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
        # the division straight into the result (cast to its dtype), and the copies taken from it
        if shared:
            np.divide(slab, counts.astype(slab.dtype).reshape((-1,) + (1,) * (slab.ndim - 1)), out=old_out,
                      casting="unsafe")
        else:
            old_out[...] = slab
        np.take(old_out, src_index, axis=0, out=new_out)
        new_out[~live] = 0

    def corrected(slab: np.ndarray, old_out: np.ndarray, new_out: np.ndarray) -> None:
        # perturbed copies (noise, lemon): the corrections summed in the compute dtype, then stored
        if method == "net2net":
            old = slab / counts.astype(slab.dtype).reshape((-1,) + (1,) * (slab.ndim - 1))
            new = old[src_index]
            eps = _normal(rng, noise * std, new.shape, slab.dtype)
            eps[~live] = 0
            new += eps
            np.subtract.at(old, src_index[live], eps[live])
        else:
            new = _normal(rng, std, (n, *slab.shape[1:]), slab.dtype)
            new[~live] = 0
            # the copies' weights are subtracted from the original so the sum over copies is the old weight
            old = slab.copy()
            np.subtract.at(old, src_index[live], new[live])
        new[~live] = 0
        old_out[...] = old
        new_out[...] = new

    return _grow(w, ax, layout, corrected if noisy or method == "lemon" else split)
