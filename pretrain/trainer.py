"""The training loop: build everything from the config, resume if asked, step, log, evaluate, save."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.loader import BatchLoader, PackedSamples, PrefetchLoader, resolve_sources
from data_pipeline.shards import SourceShards
from data_pipeline.tokenizer import file_sha256
from pretrain.checkpoint import CheckpointManager, RunFolder
from pretrain.config import ConfigError, ExperimentConfig, resume_changes, to_dict, to_yaml
from pretrain.consolidate import checkpoint_config
from pretrain.metrics import MetricLogger, ThroughputMeter, device_peak_flops, perplexity
from pretrain.model import flops_per_token
from pretrain.optim import apply_optim_config, build_scheduler
from pretrain.parallel import Strategy, build_strategy


def lm_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, strategy: Strategy, *positions: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of a micro-batch, computed in fp32 (by the model, so that it can
    go `train.loss_chunk_tokens` tokens at a time); with position ids, within documents."""
    with strategy.autocast():
        return model(inputs, targets, *positions)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN or Inf and `train.on_nan` is `stop`."""


def train_step(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    strategy: Strategy,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches; returns (mean loss, global grad norm, applied).

    Every micro-batch holds the same number of tokens, so the mean of the micro-batch means is the
    mean over the whole batch. When the loss or the gradient norm is not finite the update is not
    applied; loss and norm are global, so every rank decides the same. That check is the step's one
    wait for the device.
    """
    loss_sum = torch.zeros((), device=strategy.device)
    for batch in micro_batches:  # (inputs, targets) or (inputs, targets, positions)
        inputs, targets, *positions = (t.to(strategy.device, non_blocking=True) for t in batch)
        loss = lm_loss(model, inputs, targets, strategy, *positions) / len(micro_batches)
        strategy.backward(loss)
        loss_sum += loss.detach()
    loss = strategy.reduce_mean(loss_sum)
    grad_norm, applied = strategy.step(model, optimizer, grad_clip, loss)
    scheduler.step()
    return loss, grad_norm, applied


@torch.no_grad()
def evaluate(
    model: nn.Module, samples: PackedSamples, strategy: Strategy, batches: int, batch_size: int, documents: bool
) -> float:
    """Mean loss over the first `batches` x `batch_size` held-out samples (the same every time); with
    `documents`, attending within documents as in training."""
    model.eval()
    total = torch.zeros((), device=strategy.device)
    for b in range(batches):
        indices = range(b * batch_size, (b + 1) * batch_size)
        rows = torch.stack([torch.from_numpy(samples[i][0]) for i in indices]).to(strategy.device)
        positions = [torch.stack([torch.from_numpy(samples.positions(i)) for i in indices])] if documents else []
        total += lm_loss(model, rows[:, :-1], rows[:, 1:], strategy, *(p.to(strategy.device) for p in positions))
    model.train()
    return strategy.reduce_mean(total / batches).item()


def load_data(cfg: ExperimentConfig, split: str) -> PackedSamples | None:
    """Packed samples of one split, checked against the configured tokenizer.

    For validation, sources with too few held-out tokens for one sample are left out (and said so);
    None when no source has any.
    """
    tokenizer = Path(cfg.data.tokenizer)
    if not tokenizer.is_file():
        raise ConfigError(f"data.tokenizer: {tokenizer} not found (run `python -m data_pipeline prepare`?)")
    sources, weights = resolve_sources(cfg.data.root, cfg.data.sources, cfg.data.weights), cfg.data.weights
    if split != "train":
        usable = [s for s in sources if SourceShards(Path(cfg.data.root) / s, split).n_tokens > cfg.data.seq_len]
        if usable != sources:
            print(
                f"{split}: no held-out sample of {cfg.data.seq_len + 1} tokens in "
                f"{[s for s in sources if s not in usable]}; evaluating on {usable or 'nothing'}"
            )
        if not usable:
            return None
        sources, weights = usable, {s: w for s, w in weights.items() if s in usable}
    samples = PackedSamples(
        cfg.data.root, cfg.data.seq_len, split, sources, cfg.data.seed, file_sha256(tokenizer), weights
    )
    vocab = max(s.manifest.vocab_size for s in samples.streams)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab}")
    return samples


def check_init_tokenizer(cfg: ExperimentConfig) -> None:
    """Weights from `import` carry their tokenizer: the shards must have been made with that one."""
    if not cfg.train.init_from:
        return
    theirs = Path(cfg.train.init_from) / "tokenizer.model"
    if theirs.is_file() and file_sha256(theirs) != file_sha256(cfg.data.tokenizer):
        raise ConfigError(
            f"train.init_from: those weights were trained with {theirs}, but data.tokenizer={cfg.data.tokenizer} "
            "is another model; tokenize the data with theirs (the pipeline's tokenizer.path, then "
            "`python -m data_pipeline tokenize`) and point data.tokenizer at it"
        )


class PreemptionSignal:
    """Remembers a SIGTERM or SIGUSR1 (a scheduler's warning) until the step ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.name: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    @property
    def received(self) -> bool:
        """Whether a signal came in."""
        return self.name is not None

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the experiment; return a summary with the final loss and where things went.

    The run folder is held from start to end: locked against a second trainer, refused when it cannot
    be written, and cleaned of what a killed save left before anything is read from it.
    """
    strategy = build_strategy(cfg)
    checkpoints = CheckpointManager(cfg.train.run_dir, strategy, cfg.train.keep_last, cfg.train.verify_checkpoints)
    with RunFolder(cfg.train.run_dir, strategy, checkpoints):
        return _train(cfg, strategy, checkpoints)


def _train(cfg: ExperimentConfig, strategy: Strategy, checkpoints: CheckpointManager) -> dict[str, Any]:
    """`train` in its held run folder."""
    t, run_dir = cfg.train, Path(cfg.train.run_dir)
    train_data = load_data(cfg, "train")
    val_data = load_data(cfg, "val") if t.eval_every else None
    global_batch = t.global_batch_tokens // cfg.data.seq_len
    loader = PrefetchLoader(
        BatchLoader(
            train_data,
            global_batch,
            t.micro_batch_size,
            strategy.rank,
            strategy.world_size,
            with_positions=cfg.data.document_attention,
        )
    )

    check_init_tokenizer(cfg)
    resume_from = checkpoints.latest() if t.resume == "auto" else None if t.resume == "never" else Path(t.resume)
    if resume_from is not None:
        checkpoints.check(resume_from)  # every file whole (sizes, checksums) before any is read
    # a changed config is refused before anything is built, unless train.resume_changes names the keys
    applied, how = ([], []) if resume_from is None else resume_changes(checkpoint_config(resume_from), cfg, resume_from)
    torch.manual_seed(t.seed)
    # a resumed run takes its weights from its checkpoint: `init_from` only starts a new one
    model, optimizer = strategy.setup(cfg if resume_from is None else replace(cfg, train=replace(t, init_from=None)))
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    step, run_id = 0, uuid.uuid4().hex[:12]
    if resume_from is not None:
        state = checkpoints.load(resume_from, model, optimizer, expect_model=to_dict(cfg)["model"])
        scheduler.load_state_dict(state["scheduler"])
        data_state = dict(state["data"])  # its token counts are of all ranks: rank 0 carries them on
        if not strategy.is_main:
            data_state["tokens_per_source"] = [0] * len(data_state["tokens_per_source"])
        loader.load_state_dict(data_state)
        step, run_id = state["step"], state["wandb_run_id"]
        if t.stop_at is not None and t.stop_at <= step:
            raise ConfigError(
                f"train.stop_at={t.stop_at}, but {resume_from} is at step {step}: nothing to train; "
                "raise train.stop_at or leave it unset"
            )
        lr_before = scheduler.get_last_lr()[0]
        if applied:
            apply_optim_config(optimizer, scheduler, cfg.optim)
        if strategy.is_main:
            print(f"resumed from {resume_from} at step {step}")
            if how:
                print(f"changed since the checkpoint (how it runs, not what it trains): {'; '.join(how)}")
            if applied:
                print(
                    f"applied on resume (train.resume_changes): {'; '.join(applied)}; the learning rate of step "
                    f"{step + 1} is {scheduler.get_last_lr()[0]:.6g} (the checkpoint's schedule: {lr_before:.6g})"
                )
            if step >= t.steps:
                print(f"train.steps={t.steps} are done: nothing to train (README: extending a run)")
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = MetricLogger(run_dir, cfg, run_id, step, enabled=strategy.is_main)
    meter = ThroughputMeter(
        t.global_batch_tokens,
        flops_per_token(cfg.model, cfg.data.seq_len),
        strategy.world_size,
        device_peak_flops(strategy.device, cfg.metrics.peak_flops),
        cfg.metrics.skip_steps,
    )

    def save(asynchronous: bool = False) -> Path:
        state = {
            "scheduler": scheduler.state_dict(),
            "data": {**loader.state_dict(), "tokens_per_source": tokens_per_source()},
            "config": to_dict(cfg),
            "wandb_run_id": run_id,
        }
        return checkpoints.save(step, model, optimizer, state, asynchronous)

    def tokens_per_source() -> list[int]:
        """Tokens seen per source by all ranks together (each rank counts its own slice)."""
        counts = torch.tensor(loader.tokens_per_source, dtype=torch.float64, device=strategy.device)
        return (strategy.reduce_mean(counts) * strategy.world_size).round().long().tolist()

    model.train()
    last_loss, last_ckpt = float("nan"), resume_from
    last_step = min(t.steps, t.stop_at or t.steps)
    skipped, preempted = 0, False
    stop_signal = PreemptionSignal()
    try:
        while step < last_step:
            t0 = time.perf_counter()
            micro_batches = loader.next_batch()
            meter.step(time.perf_counter() - t0)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            loss, grad_norm, applied = train_step(
                model, micro_batches, optimizer, scheduler, strategy, cfg.optim.grad_clip
            )
            step += 1
            if not applied:
                message = f"step {step}: loss {loss.item()}, grad norm {grad_norm.item()}"
                if t.on_nan == "stop":
                    raise NonFiniteLoss(f"{message}; stopped (train.on_nan=skip skips such steps)")
                skipped += 1
                if strategy.is_main:
                    print(f"{message}; update skipped ({skipped} so far)", flush=True)
            if step % t.log_every == 0 or step in (1, last_step):
                last_loss = loss.item()
                logger.log(
                    {
                        "step": step,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        **meter.window(),
                        "peak_mem_gb": strategy.peak_memory_gb(),
                        "tokens_seen": step * t.global_batch_tokens,
                        "skipped_steps": skipped,
                        **{f"tokens_seen/{s}": int(n) for s, n in zip(train_data.sources, tokens_per_source())},
                    }
                )
                meter.reset()
            if val_data is not None and (step % t.eval_every == 0 or step == last_step):
                val_loss = evaluate(
                    model, val_data, strategy, t.eval_batches, t.micro_batch_size, cfg.data.document_attention
                )
                logger.log({"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
                meter.reset()
            preempted = strategy.any(stop_signal.received)
            checkpoints.poll()  # publish a finished asynchronous save
            if step == last_step or preempted:
                last_ckpt = save()
            elif t.save_every and step % t.save_every == 0:
                last_ckpt = save(asynchronous=t.async_save)
                meter.reset()
            if preempted:
                if strategy.is_main:
                    print(f"preempted by {stop_signal.name} at step {step}: saved {last_ckpt}; the next launch resumes")
                break

    finally:
        loader.close()
        stop_signal.restore()

    summary = {
        "rank": strategy.rank,
        "step": step,
        "preempted": preempted,
        "skipped_steps": skipped,
        "loss": last_loss,
        "run_dir": str(run_dir),
        "checkpoint": str(last_ckpt),
        "metrics": str(logger.path),
        "wandb": logger.wandb_location(),
        **meter.average(),
    }
    logger.close()
    return summary
