"""Pure-numpy weight solvers of the width morph: new incoming filters, new outgoing weights, replication.

A widened channel axis is described by where the old channels sit in an array axis (`offset`,
each channel owning `block` consecutive entries, e.g. H*W columns after a Flatten) and by the
insertions `(pos, count)`: `count` new channels placed after old channel `pos - 1`. `sources`
lists, per new channel in insertion order, the old channel it copies (replication) or -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Insertions = Sequence[tuple[int, int]]

METHODS = ("netmorph", "net2net", "lemon")


def _take(array: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    return np.take(array, index, axis=axis)


def channel_index(offset: int, block: int, channels: Sequence[int]) -> np.ndarray:
    """Array indices (along the axis) of `channels`, each expanded to its `block` entries."""
    channels = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
    return (offset + channels * block + np.arange(block)).reshape(-1)


def insert_channels(array: np.ndarray, axis: int, offset: int, block: int, inserts: Insertions,
                    new: np.ndarray) -> np.ndarray:
    """`array` with `new` (its `axis` holding sum(count) * block entries, in insertion order) inserted.

    Insertion `(pos, count)` goes at index `offset + pos * block`; insertions are applied from the
    last to the first so that every position refers to the old layout.
    """
    axis = axis % array.ndim
    pieces = []
    start = 0
    for pos, count in inserts:
        pieces.append((offset + pos * block, _take(new, axis, np.arange(start, start + count * block))))
        start += count * block
    if start != new.shape[axis]:
        raise ValueError(f"expected {start} new entries along axis {axis}, got {new.shape[axis]}")
    out = array
    for at, piece in sorted(pieces, key=lambda p: p[0], reverse=True):
        out = np.concatenate([_take(out, axis, np.arange(at)), piece.astype(array.dtype),
                              _take(out, axis, np.arange(at, out.shape[axis]))], axis=axis)
    return out


def source_entries(array: np.ndarray, axis: int, offset: int, block: int, sources: Sequence[int],
                   old: int | None = None) -> np.ndarray:
    """The entries along `axis` of new channels that copy `sources`; a source of -1 is the mean of the `old`
    channels, -2 is zero (average expansion: a new channel that carries a stream's mean, or nothing)."""
    ax = axis % array.ndim
    sources = np.asarray(sources, dtype=np.int64)
    picked = _take(array, ax, channel_index(offset, block, np.maximum(sources, 0)))
    if (sources == -2).any():
        picked = np.moveaxis(picked, ax, 0).copy()
        picked[np.repeat(sources == -2, block)] = 0
        picked = np.moveaxis(picked, 0, ax)
    if not (sources == -1).any():
        return picked
    if old is None:
        raise ValueError("a mean channel needs the number of old channels")
    entries = np.moveaxis(_take(array, ax, np.arange(offset, offset + old * block)), ax, 0).astype(np.float64)
    mean = entries.reshape(old, block, *entries.shape[1:]).mean(axis=0)
    moved = np.moveaxis(picked, ax, 0).copy()
    for i in np.nonzero(sources == -1)[0]:
        moved[i * block:(i + 1) * block] = mean
    return np.moveaxis(moved, 0, ax)


def average_sources(old: int, added: int, rng: np.random.Generator, extra: int = -1) -> np.ndarray:
    """Average expansion to `old + added` channels: whole copies of every channel, then `extra` channels (-1: the
    mean, -2: zero)."""
    copies = added // old
    whole = [rng.permutation(old) for _ in range(copies)]
    return np.concatenate(whole + [np.full(added - copies * old, extra)]).astype(np.int64)


def new_count(inserts: Insertions) -> int:
    return int(sum(count for _, count in inserts))


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


def _scale(array: np.ndarray, fallback_fan_in: int) -> float:
    std = float(np.std(array)) if array.size else 0.0
    if not np.isfinite(std) or std == 0.0:
        std = float(np.sqrt(2.0 / max(fallback_fan_in, 1)))
    return std


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
    """New filters of a widened producer along `axis` (output channels).

    mode `random`: Gaussian with the std of the existing filters (netmorph), except the first
    `zero_first` new channels, whose filters are 0 (an LRN downstream needs the new channels its
    old channels' windows reach to be exactly 0); `copy`: copies of `sources`.
    Per-channel parameters (bias, BN statistics) use the same call with their own mode.
    """
    ax = axis % w.ndim
    n = new_count(inserts) * block
    shape = list(w.shape)
    shape[ax] = n
    if mode == "copy":
        new = source_entries(w, ax, offset, block, sources, old)
    elif mode == "random":
        fan_in = int(np.prod(shape)) // max(n, 1)
        new = rng.normal(0.0, _scale(w, fan_in), size=shape)
        np.moveaxis(new, ax, 0)[:zero_first * block] = 0.0
    else:
        raise ValueError(f"unknown incoming mode {mode!r}")
    return insert_channels(w, axis, offset, block, inserts, new)


def fill_channels(p: np.ndarray, axis: int, inserts: Insertions, value: float, *, sources: np.ndarray | None = None,
                  offset: int = 0, block: int = 1, old: int | None = None) -> np.ndarray:
    """A per-channel parameter extended with `value` (or, with `sources`, with the copied channels' values)."""
    if sources is not None:
        return solve_widen_incoming(p, axis, inserts, np.random.default_rng(0), mode="copy", sources=sources,
                                    offset=offset, block=block, old=old)
    shape = list(p.shape)
    shape[axis % p.ndim] = new_count(inserts) * block
    return insert_channels(p, axis, offset, block, inserts, np.full(shape, value, dtype=p.dtype))


def solve_widen_outgoing(w: np.ndarray, axis: int, inserts: Insertions, rng: np.random.Generator, *,
                         method: str, sources: np.ndarray | None = None, offset: int = 0, block: int = 1,
                         noise: float = 0.0, random_first: int = 0) -> np.ndarray:
    """Consumer weights on the widened input axis `axis`, chosen so the consumer's output is unchanged.

    netmorph: new entries zero, except those of the first `random_first` new channels, which are
    random (exact only because those channels are exactly 0: they then still get gradients).
    net2net: each old channel and its copies share its weight equally; `noise`
    adds a compensated perturbation (the copies' perturbations are subtracted from the original).
    lemon: the copies get random weights and the original the remainder, so the sum is unchanged.
    """
    ax = axis % w.ndim
    n = new_count(inserts) * block
    shape = list(w.shape)
    shape[ax] = n
    if method == "netmorph":
        new = np.zeros(shape, dtype=w.dtype)
        if random_first:
            live = np.moveaxis(new, ax, 0)[:random_first * block]
            live[...] = rng.normal(0.0, _scale(w, w.shape[ax]), size=live.shape)
        return insert_channels(w, axis, offset, block, inserts, new)
    if method not in ("net2net", "lemon"):
        raise ValueError(f"unknown method {method!r}")
    old = w.astype(np.float64)
    sources = np.asarray(sources, dtype=np.int64)
    # mean channels (source -1, average expansion) are read with weight 0; copies share their original's weight
    live = np.repeat(sources >= 0, block)
    src_index = channel_index(offset, block, np.maximum(sources, 0))
    counts = np.ones(w.shape[ax], dtype=np.float64)
    np.add.at(counts, src_index[live], 1.0)
    bshape = [1] * w.ndim
    bshape[ax] = -1
    if method == "net2net":
        old = old / counts.reshape(bshape)
        new = _take(old, ax, src_index)
        if noise > 0.0:
            eps = rng.normal(0.0, noise * _scale(w, w.shape[ax]), size=new.shape)
            np.moveaxis(eps, ax, 0)[~live] = 0.0
            new = new + eps
            correction = np.zeros_like(old)
            np.add.at(np.moveaxis(correction, ax, 0), src_index[live], np.moveaxis(eps, ax, 0)[live])
            old = old - correction
    else:
        new = rng.normal(0.0, _scale(w, w.shape[ax]), size=shape)
        # the copies' weights are subtracted from the original so the sum over copies is the old weight
        correction = np.zeros_like(old)
        np.add.at(np.moveaxis(correction, ax, 0), src_index[live], np.moveaxis(new, ax, 0)[live])
        old = old - correction
    np.moveaxis(new, ax, 0)[~live] = 0.0
    return insert_channels(old.astype(w.dtype), axis, offset, block, inserts, new.astype(w.dtype))
