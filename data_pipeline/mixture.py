"""Blending sources by sampling weight: global sample index -> (source, window), a pure function.

LLaMA-1 (Table 1) samples its sources by proportion, e.g. CommonCrawl 67%, C4 15%, GitHub 4.5%,
Wikipedia 4.5%, Books 4.5%, ArXiv 2.5%, StackExchange 2%, so small sources are seen for several
epochs and large ones for about one. Here:

1. The global sample order is cut into blocks of `block_size` samples. Every block holds the same
   number of samples of each source, `counts[s]`, the largest-remainder rounding of
   `weight[s] * block_size`, interleaved evenly (with a seeded phase per block), so any stretch of
   the order holds each source's share to within a sample or two.
2. The k-th sample drawn from a source is window `perm(k mod W)` of epoch `k // W` (W windows in the
   source): without replacement within an epoch, reshuffled each epoch.

The per-epoch permutation is a keyed Feistel network (cycle-walking onto [0, n)), so nothing of the
size of a source is ever materialised: a source of a trillion tokens costs no memory, and any index
is located directly (one block of bookkeeping is cached), which makes resume and any world size exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scrambling of uint64 values."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


@lru_cache(maxsize=1 << 16)
def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, source, epoch, ...)."""
    key = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for part in parts:
        with np.errstate(over="ignore"):
            key = _mix64(key ^ np.array([part & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(key[0])


@lru_cache(maxsize=4096)
def _round_keys(key: int, rounds: int) -> tuple[np.uint64, ...]:
    """The Feistel round keys of a permutation key."""
    return tuple(np.uint64(derive_key(key, r)) for r in range(rounds))


def permute(index: np.ndarray | int, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """Position of `index` under a pseudo-random permutation of [0, n) chosen by `key`.

    A balanced Feistel network over the smallest even number of bits that covers n, with
    cycle-walking: values that land outside [0, n) are permuted again until they fall inside.
    """
    shape = np.shape(index)
    idx = np.atleast_1d(np.asarray(index, dtype=np.uint64))
    if n <= 0:
        raise ValueError("cannot permute an empty range")
    if np.any(idx >= np.uint64(n)):
        raise IndexError(f"index out of range for a permutation of {n}")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    low_mask = np.uint64((1 << half) - 1)
    round_keys = _round_keys(key, rounds)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low_mask
        for rk in round_keys:
            left, right = right, left ^ (_mix64(right ^ rk) & low_mask)
        return (left << np.uint64(half)) | right

    out = feistel(idx)
    outside = out >= np.uint64(n)
    while np.any(outside):
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64).reshape(shape)


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` that add up to `total` (Hamilton's method, stable ties)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class Mixture:
    """Which window of which source sits at each global sample index, for given weights."""

    def __init__(self, windows: list[int], weights: list[float], seed: int, block_size: int = 1 << 14):
        self.windows = np.asarray(windows, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.seed, self.block_size = seed, block_size
        self.counts = largest_remainder(self.weights, block_size)  # samples of each source per block
        self._cached = (-1, np.zeros(0, np.int64), np.zeros(0, np.int64))  # (block, source, rank) of its slots

    def _block_slots(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of each slot of a block, and which of that source's draws in the block it is.

        Interleaved so that every prefix holds each source's share to within one sample: source s's
        j-th slot comes at time (j + u_s) / counts[s], u_s a seeded random phase. The last block asked
        for is kept (one tuple, so threads sharing a Mixture never see half of one).
        """
        cached = self._cached
        if cached[0] == block:
            return cached[1], cached[2]
        phase = np.random.Generator(np.random.PCG64([self.seed, block])).random(len(self.counts))
        times = np.concatenate([(np.arange(c) + u) / c for c, u in zip(self.counts, phase) if c])
        owner = np.repeat(np.arange(len(self.counts)), self.counts)
        rank = np.concatenate([np.arange(c) for c in self.counts])
        order = np.argsort(times, kind="stable")
        self._cached = (block, owner[order], rank[order])
        return self._cached[1], self._cached[2]

    def locate_many(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample indices -> (source, window inside the source, epoch of that source), as arrays.

        One permutation call per (source, epoch) present, over all of its indices at once.
        """
        indices = np.asarray(indices, dtype=np.int64)
        blocks, slots = np.divmod(indices, self.block_size)
        source, draw = np.empty_like(indices), np.empty_like(indices)
        for block in np.unique(blocks).tolist():
            here = blocks == block
            owner, rank = self._block_slots(block)
            source[here] = owner[slots[here]]
            draw[here] = block * self.counts[source[here]] + rank[slots[here]]  # the k-th draw from its source
        epoch, offset = np.divmod(draw, self.windows[source])
        window = np.empty_like(indices)
        for s, e in np.unique(np.stack([source, epoch], axis=1), axis=0).tolist():
            group = (source == s) & (epoch == e)
            window[group] = permute(offset[group], int(self.windows[s]), derive_key(self.seed, s, e))
        return source, window, epoch

    def locate(self, index: int) -> tuple[int, int, int]:
        """Global sample index -> (source, window inside the source, epoch of that source)."""
        source, window, epoch = self.locate_many([index])
        return int(source[0]), int(window[0]), int(epoch[0])


@dataclass
class PlanRow:
    """One source's line of a blending plan."""

    source: str
    weight: float
    tokens_available: int
    tokens_drawn: int

    @property
    def epochs(self) -> float:
        """How many times the source is seen over the whole budget."""
        return self.tokens_drawn / self.tokens_available


def plan(sources: list[str], weights: list[float], tokens_available: list[int], total_tokens: int) -> list[PlanRow]:
    """Tokens each source contributes to a budget of `total_tokens`, and the epochs that implies."""
    drawn = largest_remainder(np.asarray(weights, dtype=np.float64), total_tokens)
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return [PlanRow(s, float(wi), int(a), int(d)) for s, wi, a, d in zip(sources, w, tokens_available, drawn)]


def format_plan(rows: list[PlanRow]) -> str:
    """The plan as a table."""
    lines = [f"{'source':<16}{'weight':>8}{'tokens available':>20}{'tokens drawn':>20}{'epochs':>8}"]
    for r in rows:
        lines.append(f"{r.source:<16}{r.weight:>8.2%}{r.tokens_available:>20,}{r.tokens_drawn:>20,}{r.epochs:>8.2f}")
    total_available = sum(r.tokens_available for r in rows)
    total_drawn = sum(r.tokens_drawn for r in rows)
    lines.append(f"{'total':<16}{1:>8.2%}{total_available:>20,}{total_drawn:>20,}")
    return "\n".join(lines)
