"""Blending by sampling weight: exact shares, epochs without replacement, LLaMA-1's plan."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from data_pipeline.loader import BatchLoader, PackedSamples
from data_pipeline.mixture import Mixture, derive_key, permute, plan

LLAMA1_WEIGHTS = {
    "commoncrawl": 0.67,
    "c4": 0.15,
    "github": 0.045,
    "wikipedia": 0.045,
    "books": 0.045,
    "arxiv": 0.025,
    "stackexchange": 0.02,
}
# Tokens per source implied by LLaMA-1 Table 1 (proportion x 1.4T / epochs), to 0.1B tokens.
LLAMA1_TOKENS = {
    "commoncrawl": 852.7e9,
    "c4": 198.1e9,
    "github": 98.4e9,
    "wikipedia": 25.7e9,
    "books": 28.3e9,
    "arxiv": 33.0e9,
    "stackexchange": 27.2e9,
}
LLAMA1_EPOCHS = [1.10, 1.06, 0.64, 2.45, 2.23, 1.06, 1.03]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 255, 256, 1000, 4099])
def test_permutation_is_a_bijection(n):
    out = permute(np.arange(n), n, key=42)
    assert sorted(out.tolist()) == list(range(n))
    assert int(permute(n - 1, n, key=42)) == out[-1]  # scalar and vector agree


def test_permutation_depends_on_key_and_handles_huge_ranges():
    assert not np.array_equal(permute(np.arange(100), 100, 1), permute(np.arange(100), 100, 2))
    n = 10**12  # a trillion windows cost no memory
    out = permute(np.array([0, 1, n - 1]), n, key=7)
    assert len(set(out.tolist())) == 3 and all(0 <= v < n for v in out)


def test_shares_match_the_weights_within_one_percent():
    weights = list(LLAMA1_WEIGHTS.values())
    mix = Mixture(windows=[5000, 2000, 300, 40, 25, 10, 3], weights=weights, seed=0, block_size=4096)
    counts = np.zeros(len(weights))
    for i in range(30_000):  # several blocks, and many epochs of the small sources
        counts[mix.locate(i)[0]] += 1
    assert np.abs(counts / counts.sum() - np.array(weights)).max() < 0.01
    # and any short stretch is balanced too (a sample or two per source)
    stretch = np.bincount([mix.locate(i)[0] for i in range(12_345, 12_345 + 1000)], minlength=len(weights))
    assert np.all(np.abs(stretch - 1000 * np.array(weights)) <= 2)


def test_each_epoch_is_without_replacement_and_reshuffled():
    mix = Mixture(windows=[50, 7], weights=[0.5, 0.5], seed=3, block_size=64)
    draws = {0: [], 1: []}
    for i in range(400):
        source, window, epoch = mix.locate(i)
        draws[source].append((epoch, window))
    for source, w in ((0, 50), (1, 7)):
        epochs = {}
        for epoch, window in draws[source]:
            epochs.setdefault(epoch, []).append(window)
        complete = [e for e, ws in epochs.items() if len(ws) == w]
        assert len(complete) >= 3
        for e in complete:
            assert sorted(epochs[e]) == list(range(w))
        assert len({tuple(epochs[e]) for e in complete}) == len(complete)  # a new order each epoch


def test_llama1_plan_reproduces_table_1_epochs():
    names = list(LLAMA1_WEIGHTS)
    rows = plan(names, list(LLAMA1_WEIGHTS.values()), [int(LLAMA1_TOKENS[n]) for n in names], int(1.4e12))
    assert [round(r.epochs, 2) for r in rows] == LLAMA1_EPOCHS
    assert sum(r.tokens_drawn for r in rows) == int(1.4e12)
    assert rows[0].tokens_drawn == int(0.67 * 1.4e12)


def test_plan_command_prints_the_table():
    tokens = [f"{k}={v}" for k, v in LLAMA1_TOKENS.items()]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "plan",
            "configs/experiments/llama1-65b.yaml",
            "--total",
            "1.4e12",
            "--tokens",
            *tokens,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert [float(lines[name][-1]) for name in LLAMA1_WEIGHTS] == LLAMA1_EPOCHS
    assert lines["commoncrawl"][1] == "67.00%"


def test_weighted_loader_shares_and_world_sizes(tiny_data):
    a, b = tiny_data["sources"]
    samples = PackedSamples(tiny_data["root"], seq_len=32, seed=5, weights={a: 0.8, b: 0.2})
    loader = BatchLoader(samples, global_batch_size=16, micro_batch_size=4)
    for _ in range(150):
        loader.next_batch()
    share = loader.tokens_per_source / loader.tokens_per_source.sum()
    assert abs(share[samples.sources.index(a)] - 0.8) < 0.01
    for world in (2, 4):  # the union over ranks is the single-process batch, in order
        for step in range(3):
            whole = BatchLoader(samples, 16, 2, start_index=step * 16).next_batch()
            parts = [
                BatchLoader(samples, 16, 2, rank=r, world_size=world, start_index=step * 16).next_batch()
                for r in range(world)
            ]
            joined = np.concatenate([x.numpy() for part in parts for x, _ in part])
            assert np.array_equal(joined, np.concatenate([x.numpy() for x, _ in whole]))


def test_weights_naming_an_unknown_source_are_refused(tiny_data):
    from data_pipeline.shards import ShardError

    with pytest.raises(ShardError, match=r"data.weights names \['nope'\]"):
        PackedSamples(tiny_data["root"], seq_len=32, sources=tiny_data["sources"], weights={"nope": 1.0})


def reference_locate(mix: Mixture, index: int) -> tuple[int, int, int]:
    """The documented order computed one index at a time, in plain Python where it can be."""
    block, slot = divmod(index, mix.block_size)
    phase = np.random.Generator(np.random.PCG64([mix.seed, block])).random(len(mix.counts))
    slots = sorted(
        ((j + u) / c, s, j) for s, (c, u) in enumerate(zip(mix.counts.tolist(), phase.tolist())) for j in range(c)
    )  # (time, source, rank); ties keep source order, as a stable sort does
    _, source, rank = slots[slot]
    epoch, offset = divmod(block * int(mix.counts[source]) + rank, int(mix.windows[source]))
    return source, int(permute(offset, int(mix.windows[source]), derive_key(mix.seed, source, epoch))), epoch


def test_vectorised_order_equals_the_one_index_reference_and_is_unchanged():
    mix = Mixture(
        windows=[5000, 2000, 300, 40, 25, 10, 3], weights=list(LLAMA1_WEIGHTS.values()), seed=11, block_size=64
    )
    indices = list(range(300)) + [4097, 123456, 10**9 + 7]
    got = list(zip(*(a.tolist() for a in mix.locate_many(np.array(indices[::-1])))))[::-1]  # any order, many blocks
    assert got == [reference_locate(mix, i) for i in indices]
    assert [mix.locate(i) for i in indices[-3:]] == got[-3:]
    # values computed one index at a time by the code before vectorising (commit 724de5b)
    pinned = [0, 1, 2, 3, 63, 64, 65, 500, 4097, 123456, 10**9 + 7]
    assert [mix.locate(i) for i in pinned] == [
        (0, 2731, 0), (3, 23, 0), (0, 3376, 0), (4, 8, 0), (0, 1838, 0), (0, 4050, 0),
        (0, 1629, 0), (0, 4783, 0), (3, 34, 4), (0, 2519, 16), (0, 4861, 134375),
    ]  # fmt: skip
