"""Held-out loss and perplexity per source, and blended by the training weights.

Each source's validation split is packed into `seq_len + 1` windows of its own. An evaluation scores
the first `n = min(train.eval_batches x micro_batch_size, windows)` of them, the same every time and
whatever the world size: `train.eval_batches` counts micro-batches in total, not per rank. The `W`
data-parallel ranks share them out, rank r taking windows r, r + W, r + 2W, ... (the last ranks one
fewer when W does not divide n). Every rank runs the same number of forward passes (FSDP and ZeRO-3
gather parameters in each), a rank short of windows scoring a stand-in that counts for nothing. Each
window counts once, by its scored tokens (an SFT source's masked targets count for nothing): sums of
token losses and of tokens are kept in float64 and added over ranks, so a run resumed on another number
of ranks logs the figures it would have logged unbroken.

`python -m pretrain evaluate CHECKPOINT` does the same for a saved checkpoint of any strategy.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from data_pipeline.loader import IGNORE_INDEX, PackedSamples, resolve_sources, targets
from data_pipeline.shards import SourceShards
from data_pipeline.tokenizer import file_sha256
from pretrain.config import CommandLineError, ConfigError, ExperimentConfig, check_paths
from pretrain.metrics import perplexity


def held_out_sets(cfg: ExperimentConfig, only: Optional[Sequence[str]] = None, quiet: bool = False) -> dict:
    """{source: its packed validation windows} for the configured sources (or `only`); sources with fewer
    held-out tokens than one window are left out, and said so."""
    sources = resolve_sources(cfg.data.root, cfg.data.sources, cfg.data.weights)
    if only:
        unknown = [s for s in only if s not in sources]
        if unknown:
            raise ConfigError(f"--sources {','.join(unknown)}: not among this run's sources {sources}")
        sources = list(only)
    sha = file_sha256(cfg.data.tokenizer)
    sets, short = {}, []
    for source in sources:
        if SourceShards(Path(cfg.data.root) / source, "val").n_tokens > cfg.data.seq_len:
            sets[source] = PackedSamples(cfg.data.root, cfg.data.seq_len, "val", [source], cfg.data.seed, sha)
        else:
            short.append(source)
    if short and not quiet:
        print(
            f"val: no held-out sample of {cfg.data.seq_len + 1} tokens in {short}; "
            f"evaluating on {list(sets) or 'nothing'}"
        )
    return sets


def blend_weights(cfg: ExperimentConfig, sources: Sequence[str], sets: dict) -> dict[str, float]:
    """The weights of the blended figure: the training mixture's (data.weights), else each source's
    held-out size, normalised over the sources evaluated."""
    raw = {s: float(cfg.data.weights[s]) if cfg.data.weights else float(sets[s].n_windows) for s in sources}
    total = sum(raw.values())
    return {s: w / total for s, w in raw.items()}


def check_held_out(sets: dict, rank: int = 0, world_size: int = 1) -> None:
    """Check the sha256 of this rank's share of the held-out shards (shards r, r + W, ... of all sources),
    as the training shards are checked (`loader.BatchLoader`); a mismatch is a `ShardError` naming the
    file. Each shard is hashed once per process: later calls return at once."""
    shards = [shard for samples in sets.values() for stream in samples.streams for shard in stream.shards]
    for shard in shards[rank::world_size]:
        shard.verify()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sets: dict,
    strategy,
    batches: int,
    micro_batch_size: int,
    documents: bool,
    weights: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    """Held-out loss and perplexity per source and blended: `val_loss/<source>`, `val_ppl/<source>`,
    `val_tokens/<source>` (tokens scored by all ranks), and `val_loss`, `val_ppl` (weighted by
    `weights`, default equal), over the first `batches x micro_batch_size` windows of each source, shared
    out between the data-parallel ranks. Every rank must call it at the same time. The held-out shards'
    sha256 is checked first (`check_held_out`), so a damaged shard is never scored."""
    was_training = model.training
    # by data-parallel rank: the ranks of a tensor-parallel group score the same rows
    world, rank, device = strategy.data_world_size, strategy.data_rank, strategy.device
    check_held_out(sets, rank, world)
    model.eval()
    record: dict[str, float] = {}
    losses = {}
    for source, samples in sets.items():
        n = min(batches * micro_batch_size, samples.n_windows)  # a total: the same windows on any world size
        mine = list(range(rank, n, world))
        passes = math.ceil(math.ceil(n / world) / micro_batch_size)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        for b in range(passes):
            rows = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
            tokens, _, positions, mask = samples.batch(rows or [0], positions=documents)
            labels = targets(tokens, mask)  # (rows, seq_len), -100 where an SFT source masks the token out
            count = int((labels != IGNORE_INDEX).sum())
            tokens, labels = torch.from_numpy(tokens).to(device), torch.from_numpy(labels).to(device)
            extra = [torch.from_numpy(positions).to(device)] if documents else []
            with strategy.autocast():
                loss = model(tokens[:, :-1], labels, *extra)
            if rows and count:  # a stand-in pass only keeps the ranks in step; a fully masked one scores nothing
                sums += torch.stack([loss.double() * count, torch.tensor(count, dtype=torch.float64, device=device)])
        total = strategy.reduce_mean(sums) * world
        loss_sum, tokens_scored = total.tolist()
        losses[source] = loss_sum / tokens_scored if tokens_scored else float("nan")
        record[f"val_loss/{source}"] = losses[source]
        record[f"val_ppl/{source}"] = perplexity(losses[source])
        record[f"val_tokens/{source}"] = int(round(tokens_scored))
    if losses:
        weights = weights or {s: 1 / len(losses) for s in losses}
        blended = sum(weights[s] * losses[s] for s in losses) / sum(weights[s] for s in losses)
        record = {"val_loss": blended, "val_ppl": perplexity(blended), **record}
    if was_training:
        model.train()
    return record


def format_evaluation(record: dict[str, float]) -> str:
    """One line per source and the blend, for the console."""
    sources = [k.split("/", 1)[1] for k in record if k.startswith("val_loss/")]
    width = max([len(s) for s in sources] + [7])
    lines = [f"{'source':<{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>12}"]
    for s in sources:
        lines.append(
            f"{s:<{width}}  {record[f'val_loss/{s}']:>8.4f}  {record[f'val_ppl/{s}']:>10.2f}  "
            f"{record[f'val_tokens/{s}']:>12,}"
        )
    if "val_loss" in record:
        lines.append(f"{'blended':<{width}}  {record['val_loss']:>8.4f}  {record['val_ppl']:>10.2f}")
    return "\n".join(lines)


def checkpoint_experiment(checkpoint: Path, overrides: Sequence[str]) -> ExperimentConfig:
    """The config a checkpoint was saved with, `overrides` on top."""
    from omegaconf import OmegaConf

    from pretrain.config import load_config
    from pretrain.consolidate import checkpoint_config

    saved = checkpoint_config(checkpoint)
    if "train" not in saved:
        raise ConfigError(f"{checkpoint}: weights only (an import folder); evaluate a training checkpoint")
    with tempfile.TemporaryDirectory() as folder:  # through the YAML loader: validated as any config
        path = Path(folder) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
        return load_config(path, overrides)


# The keys of a checkpoint's config that `evaluate` applies: what it scores and how it runs. The model, its
# adapter and the rest of the run are the checkpoint's own: an override of them would be ignored.
EVALUATE_KEYS = (
    "data",
    "train.eval_batches",
    "train.micro_batch_size",
    "train.loss_chunk_tokens",
    "train.device",
    "train.precision",
    "train.reshard_after_forward",  # the FSDP-sharded evaluation under torchrun
)


def evaluate_overrides(overrides: Sequence[str]) -> list[str]:
    """`overrides`, refusing in one line the first of a key `evaluate` cannot apply (not in `EVALUATE_KEYS`)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if "=" in item and not any(key == k or key.startswith(k + ".") for k in EVALUATE_KEYS):
            taken = ", ".join(f"{k}.*" if "." not in k else k for k in EVALUATE_KEYS)
            raise CommandLineError(
                f"{item}: evaluate cannot apply {key} to a saved checkpoint (its model, adapter and run are its "
                f"own); it takes overrides of {taken}"
            )
    return list(overrides)


def main(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint: one process, or every rank of a torchrun launch on its own slice."""
    import json
    import os

    from pretrain.generate import load_for_inference
    from pretrain.parallel.single import SingleDevice

    cfg = checkpoint_experiment(args.checkpoint, evaluate_overrides(args.overrides))
    check_paths(cfg, ["data.tokenizer", "data.root"])
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = ranks > 1 and cfg.peft.quantize == "none"  # a QLoRA base is NF4 under one process's strategy only
    strategy = SingleDevice(cfg) if ranks == 1 else _sharded(cfg, args.checkpoint) if sharded else _ranks(cfg)
    sets = held_out_sets(cfg, args.sources.split(",") if args.sources else None, quiet=not strategy.is_main)
    if not sets:
        raise ConfigError(f"{cfg.data.root}: no source has a held-out window of {cfg.data.seq_len + 1} tokens")
    if sharded:  # each rank keeps its shard only, as in training: a 65B checkpoint on the GPUs that trained it
        model = strategy.build_model(strategy.eval_cfg)
        model.eval()
        if strategy.is_main:
            n = strategy.world_size
            print(f"the model sharded over {n} ranks (FSDP): each holds 1/{n} of it")
    else:
        model = load_for_inference(args.checkpoint, strategy.device)
        model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    batches = args.batches or cfg.train.eval_batches
    start = time.perf_counter()
    if strategy.is_main:
        print(f"evaluating {args.checkpoint} on {len(sets)} sources ({strategy.world_size} rank(s)) ...", flush=True)
    record = evaluate(
        model,
        sets,
        strategy,
        batches,
        cfg.train.micro_batch_size,
        cfg.data.document_attention,
        blend_weights(cfg, list(sets), sets),
    )
    if strategy.is_main:
        print(format_evaluation(record))
        print(f"evaluated in {time.perf_counter() - start:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(record, indent=2))
    if strategy.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _sharded(cfg: ExperimentConfig, checkpoint: Path):
    """Evaluation under torchrun with the model sharded by FSDP2 over the ranks, its weights read from
    `checkpoint` one tensor at a time (`train.init_from`), each rank keeping its shard."""
    from dataclasses import replace

    from pretrain.config import Checkpointing
    from pretrain.parallel.fsdp import FSDP

    train = replace(
        cfg.train,
        strategy="fsdp",
        init_from=str(checkpoint),
        tensor_parallel=1,
        fsdp_shard_size=0,
        activation_checkpointing=Checkpointing.none,
        compile=False,
    )
    eval_cfg = replace(cfg, train=train, peft=replace(cfg.peft, init_from=None))
    strategy = FSDP(eval_cfg)
    strategy.eval_cfg = eval_cfg
    return strategy


def _ranks(cfg: ExperimentConfig):
    """A data-parallel stand-in for evaluation under torchrun: each rank holds the whole model."""
    import torch.distributed as dist

    from pretrain.parallel.base import DataParallelStrategy, launched_device, resolve_precision

    class Ranks(DataParallelStrategy):
        def __init__(self) -> None:
            self.device = launched_device(cfg, "torchrun --nproc-per-node N -m pretrain evaluate ...")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.precision = resolve_precision(cfg, self.device)

        def autocast(self):
            from pretrain.parallel.single import SingleDevice

            return SingleDevice.autocast(self)

    return Ranks()
