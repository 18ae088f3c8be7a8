"""Packed training samples: which sample sits at global index i is a pure function of (seed, i).

A sample is `seq_len + 1` consecutive tokens of one source's stream (documents concatenated, crossing
their boundaries, as LLaMA-1 did); windows start every `seq_len` tokens, so the last token of one
window is the first of the next and no target is lost. Sources are blended by sampling weight, each
visited without replacement within its epoch and reshuffled each epoch (`data_pipeline.mixture`).
A global batch is a contiguous range of that order, the same for any world size; each data-parallel
rank takes its slice. Every token id read is checked against the vocabulary size, and each rank checks
the sha256 of its share of the shards once, in the background (`shards.ShardVerifier`).

A source with a loss mask (SFT examples, `data_pipeline.sft`) gives targets of -100, cross_entropy's
ignore_index, where the token to predict is not trained on (prompts, system and template text); with
document positions, its packed examples never attend to each other.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from data_pipeline.mixture import Mixture
from data_pipeline.shards import ShardError, ShardVerifier, SourceShards, source_folders

IGNORE_INDEX = -100  # cross_entropy's ignore_index: a target that counts in no loss


def list_sources(root: str | os.PathLike) -> list[str]:
    """Source folders (those holding a manifest.json) under a token root; a folder of shards without
    its manifest is an error naming it (`shards.source_folders`)."""
    return [p.name for p in source_folders(root)]


def resolve_sources(
    root: str | os.PathLike, sources: Sequence[str] = (), weights: Optional[Mapping[str, float]] = None
) -> list[str]:
    """The sources to read: those named, else the keys of the weights, else every folder under root."""
    return list(sources) or list(weights or {}) or list_sources(root)


class PackedSamples:
    """All `seq_len + 1` windows of the chosen sources and split, blended by weight (see `mixture`)."""

    def __init__(
        self,
        root: str | os.PathLike,
        seq_len: int,
        split: str = "train",
        sources: Sequence[str] = (),
        seed: int = 0,
        tokenizer_sha256: Optional[str] = None,
        weights: Optional[Mapping[str, float]] = None,
    ):
        self.seq_len, self.seed = seq_len, seed
        weights = dict(weights or {})
        self.sources = resolve_sources(root, sources, weights)
        unknown = [s for s in weights if s not in self.sources]
        if unknown:
            raise ShardError(f"data.weights names {unknown}, which are not among the sources {self.sources}")
        self.streams = [SourceShards(Path(root) / s, split, tokenizer_sha256) for s in self.sources]
        self.windows = [max(st.n_tokens - 1, 0) // seq_len for st in self.streams]
        empty = [s for s, w in zip(self.sources, self.windows) if w == 0]
        if empty:
            raise ShardError(
                f"{root}: the '{split}' split of {empty} has fewer than seq_len + 1 = {seq_len + 1} tokens"
            )
        # without weights, each source in proportion to its size (one pass over everything per epoch)
        self.weights = [float(weights.get(s, 0.0)) for s in self.sources] if weights else list(map(float, self.windows))
        if weights and any(w <= 0 for w in self.weights):
            raise ShardError(
                f"data.weights: every source needs a positive weight, got {dict(zip(self.sources, self.weights))}"
            )
        self.mixture = Mixture(self.windows, self.weights, seed)
        self.vocab_size = min(st.vocab_size for st in self.streams)
        self.masked = any(st.masked for st in self.streams)  # some source has a loss mask

    @property
    def n_windows(self) -> int:
        """Windows over all sources (one natural epoch)."""
        return int(sum(self.windows))

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (source number, window number inside that source)."""
        source, window, _ = self.mixture.locate(index)
        return source, window

    def batch(
        self, indices: Sequence[int], positions: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Samples `indices` at once: their tokens, shape (n, seq_len + 1) int64, their source numbers,
        shape (n,), with `positions` their position ids (`positions(i)` of each), shape (n, seq_len), else
        shape (n, 0), and when a source has a loss mask, each token's (True: it counts in the loss), shape
        (n, seq_len + 1) bool, else shape (n, 0) (`targets` turns it into targets). The mixture locates
        them all in one vectorised call."""
        sources, windows, _ = self.mixture.locate_many(np.asarray(indices, dtype=np.int64))
        tokens = np.empty((len(sources), self.seq_len + 1), dtype=np.int64)
        ids = np.empty((len(sources), self.seq_len if positions else 0), dtype=np.int64)
        mask = np.ones((len(sources), self.seq_len + 1 if self.masked else 0), dtype=bool)
        for row, (source, start) in enumerate(zip(sources.tolist(), (windows * self.seq_len).tolist())):
            stream = self.streams[source]
            tokens[row] = stream.read(start, self.seq_len + 1)
            if positions:
                ids[row] = document_positions(stream.doc_starts(start, self.seq_len), self.seq_len)
            if stream.masked:
                mask[row] = stream.read_mask(start, self.seq_len + 1)
        if len(tokens) and tokens.max() >= self.vocab_size:  # one pass over the batch; then find the culprit
            for row, (source, start) in enumerate(zip(sources.tolist(), (windows * self.seq_len).tolist())):
                self.streams[source].check_ids(start, tokens[row])
        return tokens, sources, ids, mask

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """(tokens of sample `index`, shape (seq_len + 1,), its source number)."""
        tokens, sources, _, _ = self.batch([index])
        return tokens[0], int(sources[0])

    def positions(self, index: int) -> np.ndarray:
        """Position ids of sample `index`'s `seq_len` input tokens, reset at each document start."""
        return self.batch([index], positions=True)[2][0]


def targets(tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Next-token targets of samples (n, seq_len + 1) -> (n, seq_len) int64: `tokens[:, 1:]`, with
    IGNORE_INDEX where the token to predict is masked out of the loss (`loss_mask` (n, seq_len + 1) bool,
    as `PackedSamples.batch` gives it; of shape (n, 0) when no source has a mask: every target counts)."""
    if not loss_mask.shape[1]:
        return tokens[:, 1:]
    return np.where(loss_mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)


def document_positions(doc_starts: np.ndarray, length: int) -> np.ndarray:
    """Position of each of `length` tokens inside its document, restarting at 0 at every start.

    Tokens before the first start belong to a document that began in an earlier sample and count
    from 0 at the sample's start. This is the "reset position ids" form of document boundaries.
    """
    positions = np.arange(length, dtype=np.int64)
    starts = np.concatenate([[0], doc_starts[(doc_starts > 0) & (doc_starts < length)]]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [length]]))
    return positions - np.repeat(starts, lengths)


def cu_seqlens(positions: np.ndarray) -> np.ndarray:
    """Cumulative document lengths (flash-attention's varlen form) of one row of position ids."""
    starts = np.flatnonzero(positions == 0)
    return np.concatenate([starts, [len(positions)]]).astype(np.int32)


class BatchLoader:
    """Global batches of packed samples, this rank's slice split into micro-batches; resumable.

    Step s uses global samples [s * B, (s + 1) * B) with B = `global_batch_size` samples; rank r of
    W takes [r * B / W, (r + 1) * B / W) of those. `state_dict()` holds the next global sample index.
    With `verify_shards`, rank r checks the sha256 of shards r, r + W, ... (of all sources, in order)
    in a background thread, and `next_batch` raises a mismatch once found.
    """

    def __init__(
        self,
        samples: PackedSamples,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
        with_positions: bool = False,
        verify_shards: bool = True,
    ):
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global batch of {global_batch_size} samples does not split into micro-batches of "
                f"{micro_batch_size} on {world_size} ranks"
            )
        self.samples, self.global_batch_size, self.micro_batch_size = samples, global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.index, self.with_positions = start_index, with_positions
        self.tokens_per_source = np.zeros(len(samples.sources), dtype=np.int64)  # seen by this rank
        shards = [shard for stream in samples.streams for shard in stream.shards]
        self.verifier = ShardVerifier(shards[rank::world_size] if verify_shards else [])

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def next_batch(self) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of the next global batch, as (inputs, targets) int64 pairs, each
        (micro_batch_size, seq_len), or (inputs, targets, positions) with `with_positions` (position ids
        reset at document starts). Targets are -100 where a source's loss mask leaves the token out."""
        self.verifier.check()
        per_rank = self.global_batch_size // self.world_size
        first = self.index + self.rank * per_rank
        tokens, sources, positions, mask = self.samples.batch(range(first, first + per_rank), self.with_positions)
        np.add.at(self.tokens_per_source, sources, self.samples.seq_len)
        labels = torch.from_numpy(targets(tokens, mask))  # (per_rank, seq_len)
        tokens, positions = torch.from_numpy(tokens), torch.from_numpy(positions)
        micro_batches = []
        for m in range(0, per_rank, self.micro_batch_size):
            rows = slice(m, m + self.micro_batch_size)
            extra = (positions[rows],) if self.with_positions else ()
            micro_batches.append((tokens[rows, :-1], labels[rows], *extra))
        self.index += self.global_batch_size
        return micro_batches

    def state_dict(self) -> dict:
        """The position: next global sample index, and what is needed to check it on load."""
        return {
            "index": self.index,
            "seed": self.samples.seed,
            "n_windows": self.samples.n_windows,
            "global_batch_size": self.global_batch_size,
            "sources": self.samples.sources,
            "weights": self.samples.weights,
            "tokens_per_source": self.tokens_per_source.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position and the tokens seen per source; refuse a damaged state, or one taken over
        different data (`n_windows`), another mixture (`sources`, `weights`) or another order (`seed`)."""
        mine = self.state_dict()
        missing = [key for key in mine if key not in state]
        if missing:
            raise ValueError(f"data loader state lacks {missing} (a damaged checkpoint?)")
        for key in ("sources", "weights", "seed", "n_windows"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]!r}, but this run has {mine[key]!r}"
                )
        index, counts = state["index"], state["tokens_per_source"]
        if not _is_count(index):
            raise ValueError(f"data loader state: index={index!r} is not a sample index (a damaged checkpoint?)")
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != len(self.samples.sources)
            or not all(map(_is_count, counts))
            or sum(counts) > index * self.samples.seq_len
        ):
            raise ValueError(
                f"data loader state: tokens_per_source={counts!r} is not one count per source of "
                f"{self.samples.sources} within the {index} samples read (a damaged checkpoint?)"
            )
        self.index = index
        self.tokens_per_source = np.array(counts, dtype=np.int64)

    def close(self) -> None:
        """Stop the background shard check."""
        self.verifier.close()


def _is_count(value: object) -> bool:
    """Whether `value` is a non-negative integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


class PrefetchLoader:
    """Builds the next `depth` batches of a BatchLoader in a background thread, so a step never waits
    on reading shards. `state_dict()` is the position of the batches handed out, not of those built."""

    def __init__(self, loader: BatchLoader, depth: int = 2):
        self.loader, self.depth = loader, depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._state = loader.state_dict()

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self.loader.next_batch(), self.loader.state_dict())
            except Exception as e:  # handed to the consumer, raised there
                item = (e, None)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is None:
                return

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next batch, as `BatchLoader.next_batch` would give it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._thread.start()
        batch, state = self._queue.get()
        if state is None:
            raise batch
        self._state = state
        return batch

    @property
    def tokens_per_source(self) -> np.ndarray:
        """Tokens per source in the batches handed out."""
        return np.array(self._state["tokens_per_source"], dtype=np.int64)

    def state_dict(self) -> dict:
        """The position after the last batch handed out."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; batches built ahead from the old position are dropped."""
        self._stop_prefetch()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def _stop_prefetch(self, timeout: Optional[float] = None) -> None:
        """Stop the background thread, if started (waiting at most `timeout` seconds, None: until it has
        stopped), and forget what it built; the next batch starts it again."""
        if self._thread is None:
            return
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            try:  # free a producer blocked on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
        self._thread, self._queue = None, queue.Queue(maxsize=self.depth)
        self._stop.clear()

    def close(self) -> None:
        """Stop the background threads (a read that hangs is left behind after 5 s: the thread is a daemon)."""
        self._stop_prefetch(timeout=5)
        self.loader.close()
