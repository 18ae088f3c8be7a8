"""The training loop: build everything from the config, resume if asked, step, log, evaluate, save."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from data_pipeline.loader import IGNORE_INDEX, BatchLoader, PackedSamples, PrefetchLoader, resolve_sources
from data_pipeline.tokenizer import file_sha256
from pretrain.adapters import BASE_RECORD, base_mismatch, base_record
from pretrain.checkpoint import TRAINER, CheckpointManager, RunFolder, load_torch
from pretrain.config import ConfigError, ExperimentConfig, check_launch, resume_changes, to_dict, to_yaml
from pretrain.errors import NonFiniteLoss
from pretrain.evaluation import blend_weights, evaluate, held_out_sets
from pretrain.health import HangWatchdog, describe_ranks, gpu_health, rank_stats
from pretrain.metrics import MetricLogger, ThroughputMeter, device_peak_flops, duration
from pretrain.model import flops_per_token
from pretrain.optim import apply_optim_config, build_scheduler
from pretrain.parallel import Strategy, build_strategy
from pretrain.profiling import StepProfiler
from pretrain.runtime import configure_threads, requeue_slurm_job
from pretrain.spikes import SpikeMonitor
from pretrain.step_policy import TroublePolicy


def lm_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, strategy: Strategy, *positions: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of a micro-batch, computed in fp32 (by the model, so that it can
    go `train.loss_chunk_tokens` tokens at a time); with position ids, within documents."""
    with strategy.autocast():
        return model(inputs, targets, *positions)


def train_step(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    strategy: Strategy,
    grad_clip: float,
    masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches; returns (mean loss, global grad norm, applied).

    The loss is the mean over every target of the global batch. Without masked targets every micro-batch
    holds the same number, so the mean of the micro-batch means is that mean. With `masked` data (targets
    masked out of the loss, -100: supervised finetuning's prompts), micro-batches count different numbers
    of targets: each micro-batch's mean is weighted by its share of the targets counted over all ranks
    (one small all-reduce). When the loss or the gradient norm is not finite the update is not applied;
    loss and norm are global, so every rank decides the same. That check is the step's one wait for the
    device after the forward.
    """
    weights = [None] * len(micro_batches)  # the plain mean of the micro-batch means
    if masked:  # the data has a loss mask (every rank reads the same sources: all take this branch)
        counts = [int((batch[1] != IGNORE_INDEX).sum()) for batch in micro_batches]  # targets in the loss
        total = strategy.reduce_mean(torch.tensor(float(sum(counts)), device=strategy.device))
        total = max(total.item() * strategy.data_world_size, 1.0)  # targets counted by all data-parallel ranks
        weights = [c * strategy.data_world_size / total for c in counts]  # the ranks' gradients are averaged
    loss_sum = torch.zeros((), device=strategy.device)
    for batch, weight in zip(micro_batches, weights):  # (inputs, targets) or (inputs, targets, positions)
        inputs, targets, *positions = (t.to(strategy.device, non_blocking=True) for t in batch)
        loss = lm_loss(model, inputs, targets, strategy, *positions)
        loss = loss / len(micro_batches) if weight is None else loss * weight
        strategy.backward(loss)
        loss_sum += loss.detach()
    loss = strategy.reduce_mean(loss_sum)
    grad_norm, applied = strategy.step(model, optimizer, grad_clip, loss)
    scheduler.step()
    return loss, grad_norm, applied


def load_data(cfg: ExperimentConfig) -> PackedSamples:
    """The packed training samples, checked against the configured tokenizer and the model's vocabulary.
    (Held-out data: `pretrain.evaluation.held_out_sets`.)"""
    tokenizer = Path(cfg.data.tokenizer)
    if not tokenizer.is_file():
        raise ConfigError(f"data.tokenizer: {tokenizer} not found (run `python -m data_pipeline prepare`?)")
    sources = resolve_sources(cfg.data.root, cfg.data.sources, cfg.data.weights)
    samples = PackedSamples(
        cfg.data.root, cfg.data.seq_len, "train", sources, cfg.data.seed, file_sha256(tokenizer), cfg.data.weights
    )
    if samples.masked and not cfg.data.document_attention:
        raise ConfigError(
            f"data.root={cfg.data.root} holds supervised examples (a loss mask): set data.document_attention=true, "
            "so that the examples packed into one sequence never attend to each other"
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
    """Remembers a SIGTERM or SIGUSR1 (a scheduler's warning) or a first Ctrl-C (SIGINT) until the step ends,
    where the trainer saves and stops; a second Ctrl-C stops at once (KeyboardInterrupt), unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.name: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.name == "SIGINT":
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again: stop now, unsaved)", flush=True)
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
    check_launch(cfg)  # a batch that does not split over this launch's ranks: one message, the same on each rank
    strategy = build_strategy(cfg)
    t = cfg.train
    checkpoints = CheckpointManager(t.run_dir, strategy, t.keep_last, t.verify_checkpoints, t.keep_every)
    with RunFolder(cfg.train.run_dir, strategy, checkpoints):
        return _train(cfg, strategy, checkpoints)


def _train(cfg: ExperimentConfig, strategy: Strategy, checkpoints: CheckpointManager) -> dict[str, Any]:
    """`train` in its held run folder: where to resume from, the run built (`Run`), then the loop, each step
    batch -> step -> judge -> log -> evaluate -> save, until the last step or a preemption."""
    t = cfg.train
    train_data = load_data(cfg)
    check_init_tokenizer(cfg)
    resume_from, saved, manual_skip = where_to_resume(cfg, strategy, checkpoints)
    # a changed config is refused before anything is built, unless train.resume_changes names the keys
    applied, how = ([], []) if resume_from is None else resume_changes(saved["config"], cfg, resume_from)
    if "scheduler" in saved and saved["step"] >= t.steps:  # a finished run launched again: say so, touch nothing
        return finished_summary(cfg, strategy, saved["step"], resume_from)
    # an adapter run's checkpoints hold the adapter and name its base: the same base weights, checked by sha256
    base = base_record(cfg) if cfg.peft.method != "none" and strategy.is_main else None
    if saved.get(BASE_RECORD) is not None:
        problems = [p for p in strategy.gather(base and base_mismatch(saved[BASE_RECORD], base)) if p]
        if problems:
            raise ConfigError(f"{resume_from}: {problems[0]}")
    run = Run(cfg, strategy, checkpoints, train_data, resume_from, manual_skip, base)
    if resume_from is not None:
        run.resume(resume_from, applied, how)
    run.start(resume_from)

    last_step = min(t.steps, t.stop_at or t.steps)
    policy = TroublePolicy(t.on_nan, t.max_consecutive_skips, run.monitor)
    stop_signal = PreemptionSignal()
    profiler = StepProfiler(t.profile_steps, run.run_dir, strategy.rank, strategy.device)
    watchdog = HangWatchdog(t.hang_timeout_s, run.run_dir, strategy.rank, strategy.world_size)
    watchdog.start()
    try:
        while run.step < last_step:
            watchdog.beat(run.step, f"step {run.step + 1}")
            profiler.before(run.step + 1)
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
            loss, grad_norm, applied = run.train_one_step()
            if (traced := profiler.after(run.step)) is not None:
                run.say(f"step {run.step:>6} | profile of steps {t.profile_steps[0]}-{run.step} written to {traced}")
            decision = policy.judge(run.step, loss, grad_norm, applied)
            if decision.action == "rollback":
                policy.rolled_back(run.go_back(run.step, decision.why, decision.before))
                continue
            if decision.action == "skip":
                run.skipped += 1
                run.say(f"step {run.step}: {decision.why}; update skipped ({run.skipped} so far)")
            if run.step % t.log_every == 0 or run.step in (1, last_step):
                run.log(loss, grad_norm, lr, last_step)
            else:
                run.say.heartbeat(run.step, last_step, time.perf_counter() - run.started, run.steps_done)
            if run.val_sets and (run.step % t.eval_every == 0 or run.step == last_step):
                watchdog.beat(run.step, "the evaluation")
                run.evaluate_held_out()
            if cfg.lm_eval.every and run.step % cfg.lm_eval.every == 0:
                run.evaluate_benchmarks()
            watchdog.beat(run.step, "the agreement on preemption and the save")
            run.preempted = strategy.any(stop_signal.received)
            checkpoints.poll()  # publish a finished asynchronous save
            if run.step == last_step or run.preempted:
                run.save()
            elif t.save_every and run.step % t.save_every == 0:
                run.save(asynchronous=t.async_save)
                run.meter.reset()
            if run.preempted:
                where = f"at step {run.step}: saved {run.last_ckpt}"
                run.say(f"preempted by {stop_signal.name} {where}; the next launch resumes")
                if stop_signal.name == "SIGUSR1" and strategy.is_main:  # Slurm's warning before the time limit
                    run.say(requeue_slurm_job())
                break
    finally:
        watchdog.stop()
        profiler.close()  # a run that ended inside the window: the steps traced so far
        run.loader.close()
        stop_signal.restore()
    return run.finish()


def where_to_resume(
    cfg: ExperimentConfig, strategy: Strategy, checkpoints: CheckpointManager
) -> tuple[Optional[Path], dict[str, Any], Optional[dict]]:
    """(the checkpoint to resume, its common state (trainer.pt, read once before anything is built; {} for a
    new run), the manual skip of `train.skip_batches`). A relaunch of the same `train.resume` +
    `train.skip_batches` command (a requeue) resumes the newest checkpoint that skip led to instead."""
    t = cfg.train
    resume_from = checkpoints.latest() if t.resume == "auto" else None if t.resume == "never" else Path(t.resume)
    manual_skip = {"from": str(resume_from), "batches": t.skip_batches} if t.skip_batches else None
    if manual_skip is not None and resume_from is not None:
        latest = checkpoints.latest()
        if (
            latest is not None
            and latest != resume_from
            and load_torch(latest / TRAINER).get("manual_skip") == manual_skip
        ):
            if strategy.is_main:
                print(f"train.skip_batches={t.skip_batches} from {resume_from} was applied already: resuming {latest}")
            resume_from = latest
    saved: dict[str, Any] = {}
    if resume_from is not None:
        checkpoints.check(resume_from)  # every file whole (sizes, checksums) before any is read
        saved = load_torch(resume_from / TRAINER)
    return resume_from, saved, manual_skip


class Run:
    """One launch of a run: the model, optimizer, schedule, data, spike window, logger and meters it works with,
    its counters, and its phases: resume, one step, log, evaluate, save, go back to a checkpoint, finish."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        checkpoints: CheckpointManager,
        train_data: PackedSamples,
        resume_from: Optional[Path],
        manual_skip: Optional[dict],
        base: Optional[dict],
    ):
        t = cfg.train
        self.cfg, self.strategy, self.checkpoints, self.train_data = cfg, strategy, checkpoints, train_data
        self.run_dir = Path(t.run_dir)
        self.manual_skip, self.base = manual_skip, base
        self.val_sets = held_out_sets(cfg, quiet=not strategy.is_main) if t.eval_every else {}
        self.val_weights = blend_weights(cfg, list(self.val_sets), self.val_sets)
        self.global_batch = t.global_batch_tokens // cfg.data.seq_len
        self.loader = PrefetchLoader(
            BatchLoader(
                train_data,
                self.global_batch,
                t.micro_batch_size,
                strategy.data_rank,
                strategy.data_world_size,
                with_positions=cfg.data.document_attention,
            )
        )
        torch.manual_seed(t.seed)
        # a resumed run takes its weights from its checkpoint: `init_from` (and `peft.init_from`) only start a new
        # one, but an adapter run's frozen base comes from `init_from` again
        init_from = t.init_from if cfg.peft.method != "none" else None
        fresh = replace(cfg, train=replace(t, init_from=init_from), peft=replace(cfg.peft, init_from=None))
        self.model, self.optimizer = strategy.setup(cfg if resume_from is None else fresh)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        self.monitor = SpikeMonitor(cfg.spike, cfg.optim.warmup_steps)
        self.step, self.run_id = 0, uuid.uuid4().hex[:12]
        self.skipped, self.preempted, self.steps_done = 0, False, 0
        self.last_loss, self.last_ckpt = float("nan"), resume_from
        self.say = Console(strategy.is_main)

    def restore(self, path: Path, skip_batches: int, at_least: int = 0) -> tuple[dict[str, Any], int]:
        """Model, optimizer, schedule, data position and spike window from checkpoint `path`, the data moved
        `skip_batches` batches on (and at least to sample `at_least`). Returns the checkpoint's common
        state and the batches skipped."""
        state = self.checkpoints.load(path, self.model, self.optimizer, expect_model=to_dict(self.cfg)["model"])
        self.scheduler.load_state_dict(state["scheduler"])
        data_state = dict(state["data"])  # its token counts are of all ranks: data rank 0 carries them on
        if self.strategy.data_rank != 0:
            data_state["tokens_per_source"] = [0] * len(data_state["tokens_per_source"])
        data_state["index"] = max(data_state["index"] + skip_batches * self.global_batch, at_least)
        self.loader.load_state_dict(data_state)
        self.monitor.load_state_dict(state.get("spike_window", []))
        return state, (data_state["index"] - state["data"]["index"]) // self.global_batch

    def resume(self, resume_from: Path, applied: list[str], how: list[str]) -> None:
        """Continue from checkpoint `resume_from`: its state restored (the data moved on by a manual skip), the
        changes `train.resume_changes` names applied, and what changed said."""
        t, manual_skip = self.cfg.train, self.manual_skip
        state, skipped_now = self.restore(
            resume_from, t.skip_batches if manual_skip and resume_from == Path(manual_skip["from"]) else 0
        )
        self.step, self.run_id = state["step"], state["wandb_run_id"]
        self.manual_skip = manual_skip or state.get("manual_skip")  # carried on: the command stays a no-op to requeue
        if t.stop_at is not None and t.stop_at <= self.step:
            raise ConfigError(
                f"train.stop_at={t.stop_at}, but {resume_from} is at step {self.step}: nothing to train; "
                "raise train.stop_at or leave it unset"
            )
        lr_before = self.scheduler.get_last_lr()[0]
        if applied:
            apply_optim_config(self.optimizer, self.scheduler, self.cfg.optim)
        if self.strategy.is_main:
            if how:
                print(f"changed since the checkpoint (how it runs, not what it trains): {'; '.join(how)}")
            if applied:
                print(
                    f"applied on resume (train.resume_changes): {'; '.join(applied)}; the learning rate of step "
                    f"{self.step + 1} is {self.scheduler.get_last_lr()[0]:.6g} (the checkpoint's schedule: "
                    f"{lr_before:.6g})"
                )
            if skipped_now:
                print(
                    f"train.skip_batches={t.skip_batches}: the data moves from sample {state['data']['index']:,} "
                    f"to {state['data']['index'] + skipped_now * self.global_batch:,}"
                )

    def start(self, resume_from: Optional[Path]) -> None:
        """The run folder's config and the banner (main rank), the logger and the meters; the model in training
        mode."""
        cfg, strategy, t = self.cfg, self.strategy, self.cfg.train
        if strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            print(startup_banner(cfg, strategy, self.train_data, self.val_sets, resume_from, self.step), flush=True)
        self.logger = MetricLogger(self.run_dir, cfg, self.run_id, self.step, enabled=strategy.is_main)
        self.meter = ThroughputMeter(
            t.global_batch_tokens,
            flops_per_token(cfg.model, cfg.data.seq_len),
            strategy.world_size,
            device_peak_flops(strategy.device, cfg.metrics.peak_flops),
            cfg.metrics.skip_steps,
        )
        self.predicted = predicted_step(cfg, strategy) if strategy.is_main else None
        self.model.train()
        self.started = time.perf_counter()  # in this launch, for the ETA

    def train_one_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch through one optimizer step (`train_step`): (global loss, gradient norm, applied)."""
        t0 = time.perf_counter()
        micro_batches = self.loader.next_batch()
        self.meter.step(time.perf_counter() - t0)
        args = (self.model, micro_batches, self.optimizer, self.scheduler, self.strategy, self.cfg.optim.grad_clip)
        result = train_step(*args, masked=True) if self.train_data.masked else train_step(*args)
        self.step += 1
        self.steps_done += 1
        return result

    def log(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, last_step: int) -> None:
        """A log step: loss, rate, norm, throughput, every rank's figures, tokens seen, ETA."""
        strategy, t, step = self.strategy, self.cfg.train, self.step
        self.last_loss = loss.item()
        elapsed = time.perf_counter() - self.started
        window, peak = self.meter.window(), strategy.peak_memory_gb()
        gpu = gpu_health(strategy.device)
        ranks = rank_stats(strategy, window["step_time_s"], window["data_wait_frac"], peak, gpu)
        predicted = self.predicted
        self.logger.log(
            {
                "step": step,
                "loss": self.last_loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                **window,
                "peak_mem_gb": peak,
                **{key: value for key, value in ranks.items() if key != "hosts"},
                "tokens_seen": step * t.global_batch_tokens,
                "skipped_steps": self.skipped,
                "eta_s": elapsed / self.steps_done * (last_step - step),
                **{f"tokens_seen/{s}": int(n) for s, n in zip(self.train_data.sources, self.tokens_per_source())},
                **(predicted.record() if predicted and not predicted.logged else {}),
            }
        )
        if predicted and not predicted.logged:
            predicted.logged = True
            self.say(predicted.line())
        if ranks:
            self.say(f"step {step:>6} | {describe_ranks(ranks)}")
        self.say.mark()
        self.meter.reset()

    def evaluate_held_out(self) -> None:
        """Each held-out source's loss (`pretrain.evaluation.evaluate`), logged."""
        t, start = self.cfg.train, time.perf_counter()
        self.say(f"step {self.step:>6} | evaluating {len(self.val_sets)} held-out sources ...")
        record = evaluate(
            self.model,
            self.val_sets,
            self.strategy,
            t.eval_batches,
            t.micro_batch_size,
            self.cfg.data.document_attention,
            self.val_weights,
        )
        self.logger.log({"step": self.step, **record, "eval_time_s": time.perf_counter() - start})  # + tokens_seen
        self.meter.reset()

    def evaluate_benchmarks(self) -> None:
        """lm-eval's tasks on the live model (`lm_eval.every`), logged."""
        from pretrain.lm_eval import scores_in_training

        cfg, start = self.cfg, time.perf_counter()
        self.say(f"step {self.step:>6} | lm-eval {','.join(cfg.lm_eval.tasks)} ...")
        scores = scores_in_training(self.model, cfg, self.strategy)
        self.logger.log({"step": self.step, **scores})  # the logger adds tokens_seen
        self.say(f"step {self.step:>6} | lm-eval done in {time.perf_counter() - start:.1f} s")
        self.meter.reset()

    def save(self, asynchronous: bool = False) -> Path:
        """Checkpoint this step (model, optimizer and the common state); returns its folder."""
        state = {
            "scheduler": self.scheduler.state_dict(),
            "data": {**self.loader.state_dict(), "tokens_per_source": self.tokens_per_source()},
            "config": to_dict(self.cfg),
            "wandb_run_id": self.logger.run_id,  # a forked wandb run has a new id
            "spike_window": self.monitor.state_dict(),
            "manual_skip": self.manual_skip,  # a relaunch of the same train.resume + train.skip_batches resumes here
            BASE_RECORD: self.base,  # an adapter run: the frozen base it needs (not in the checkpoint)
        }
        start = time.perf_counter()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, state, asynchronous)
        how = "writing in the background" if self.checkpoints.pending else "saved"
        self.say(f"step {self.step:>6} | checkpoint {path.name} {how} ({time.perf_counter() - start:.1f} s)")
        self.last_ckpt = path
        return path

    def tokens_per_source(self) -> list[int]:
        """Tokens seen per source by all ranks together (each data-parallel rank counts its own slice)."""
        counts = torch.tensor(self.loader.tokens_per_source, dtype=torch.float64, device=self.strategy.device)
        return (self.strategy.reduce_mean(counts) * self.strategy.data_world_size).round().long().tolist()

    def go_back(self, bad_step: int, why: str, before: int) -> int:
        """Back to the last checkpoint before step `before` (`bad_step`, or further back after a failed retry);
        returns its step. The data moves `spike.skip_batches` batches on from the checkpoint's position, and
        at least past the batch of `bad_step` (so a spike long after the checkpoint, or a second one before
        the next save, never meets the same data)."""
        cfg = self.cfg
        self.checkpoints.wait()
        target = self.checkpoints.latest_before(before)
        if target is None:
            where = "before it" if before == bad_step else f"before step {before}, where the last retry started"
            raise NonFiniteLoss(
                f"step {bad_step}: {why}; no checkpoint {where} to go back to (train.save_every, train.keep_every)"
            )
        start = time.perf_counter()
        state, skipped_batches = self.restore(
            target, cfg.spike.skip_batches, at_least=self.loader.state_dict()["index"]
        )
        back = self.step = state["step"]
        changed, _ = resume_changes(state["config"], cfg, target)
        if changed:  # the checkpoint predates train.resume_changes: apply them again, as at launch
            apply_optim_config(self.optimizer, self.scheduler, cfg.optim)
        self.logger.rewind(back)
        self.logger.event(back, "rollback", {"from_step": bad_step, "skipped_batches": skipped_batches, "why": why})
        self.say(
            f"step {bad_step:>6} | {why}: back to {target.name}, data moved {skipped_batches} batches on "
            f"({time.perf_counter() - start:.1f} s)"
        )
        self.meter.reset()
        return back

    def finish(self) -> dict[str, Any]:
        """The run's summary; the logger closed."""
        summary = {
            "rank": self.strategy.rank,
            "step": self.step,
            "preempted": self.preempted,
            "skipped_steps": self.skipped,
            "loss": self.last_loss,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.last_ckpt),
            "metrics": str(self.logger.path),
            "wandb": self.logger.wandb_location(),
            **self.meter.average(),
            **(self.predicted.summary() if self.predicted else {}),
        }
        self.logger.close()
        return summary


class Console:
    """Lines for the console on the main rank; between log lines, a progress line when the last line
    is `LLAMA_PROGRESS_EVERY` seconds old (default 30), so a slow run is never silent for long."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.every = float(os.environ.get("LLAMA_PROGRESS_EVERY", "30"))
        self.last = time.monotonic()

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)
        self.mark()

    def mark(self) -> None:
        """A line was just printed (e.g. by the metric logger)."""
        self.last = time.monotonic()

    def heartbeat(self, step: int, last_step: int, elapsed: float, steps_done: int) -> None:
        """The progress line, when due."""
        if time.monotonic() - self.last >= self.every:
            per_step = elapsed / max(steps_done, 1)
            self(f"step {step:>6}/{last_step} | {per_step:.2f} s/step | ETA {duration(per_step * (last_step - step))}")


def last_logged_loss(run_dir: Path, step: int) -> Optional[tuple[int, float]]:
    """(step, loss) of the last training record at or before `step` in the run's metrics.jsonl, if any."""
    path = run_dir / "metrics.jsonl"
    found = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "loss" in record and record.get("step", step + 1) <= step:
                found = (record["step"], record["loss"])
    return found


def finished_summary(cfg: ExperimentConfig, strategy: Strategy, step: int, checkpoint: Path) -> dict[str, Any]:
    """What a launch of a run that has already reached `train.steps` reports: where it ended, its last
    logged loss (never NaN: None when none was logged), and nothing written."""
    run_dir = Path(cfg.train.run_dir)
    last = last_logged_loss(run_dir, step) if strategy.is_main else None
    if strategy.is_main:
        loss = f"last logged loss {last[1]:.4f} (step {last[0]})" if last else "no loss logged in metrics.jsonl"
        print(
            f"{run_dir} already finished at step {step} (train.steps={cfg.train.steps}); {loss}. Nothing to train: "
            "raise train.steps to extend it (README: extending a run), or set another train.run_dir for a new run"
        )
    return {
        "rank": strategy.rank,
        "step": step,
        "already_finished": True,
        "preempted": False,
        "skipped_steps": 0,
        "loss": last[1] if last else None,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "metrics": str(run_dir / "metrics.jsonl"),
        "wandb": "unchanged",
        "tokens_per_sec_per_gpu": None,
        "mfu": None,
    }


class PredictedStep:
    """The layout planner's prediction for the run's own layout, logged with the first log line."""

    def __init__(self, prediction, kind_name: str):
        self.prediction, self.kind, self.logged = prediction, kind_name, False

    def record(self) -> dict[str, Any]:
        p = self.prediction
        return {"predicted_tokens_per_sec_per_gpu": p.tokens_per_sec_per_gpu, "predicted_step_time_s": p.step_time_s}

    def line(self) -> str:
        p = self.prediction
        return (
            f"predicted by the layout planner ({self.kind}, {p.name}): {p.tokens_per_sec_per_gpu:,.0f} tok/s/gpu, "
            f"{p.step_time_s * 1000:.0f} ms/step (compute {p.compute_s * 1000:.0f}, "
            f"recompute {p.recompute_s * 1000:.0f}, "
            f"communication {p.comm_exposed_s * 1000:.0f}, other {(p.optimizer_s + p.overhead_s) * 1000:.0f} ms)"
        )

    def summary(self) -> dict[str, Any]:
        return {"predicted_tokens_per_sec_per_gpu": self.prediction.tokens_per_sec_per_gpu, "gpu_kind": self.kind}


def predicted_step(cfg: ExperimentConfig, strategy: Strategy) -> Optional[PredictedStep]:
    """The prediction for this run, or None when its device is no known kind (a note says how to get one).
    A prediction is never a reason to stop training: whatever goes wrong in it is one line, and no prediction."""
    from pretrain.layout import predict, run_kind
    from pretrain.runtime import processes_on_node

    device = strategy.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        kind = run_kind(cfg, name, processes_on_node())
        if kind is None:
            print(
                f"no layout-planner kind for {name} ({cfg.train.precision.value}): no predicted throughput (set "
                "metrics.gpu_kinds to the YAML of `python -m pretrain layout --calibrate`, or metrics.gpu_kind)"
            )
            return None
        return PredictedStep(predict(cfg, strategy.world_size, kind), kind.name)
    except Exception as e:  # noqa: BLE001 - the planner must never stop a run
        print(f"layout planner: no predicted throughput ({type(e).__name__}: {e})")
        return None


def startup_banner(
    cfg: ExperimentConfig,
    strategy: Strategy,
    train_data: PackedSamples,
    val_sets: dict,
    resume_from: Optional[Path],
    step: int,
) -> str:
    """What is about to run, in a few lines: model, budget, placement, data, run folder and start point."""
    from pretrain.adapters import describe_adapter
    from pretrain.memory import strategy_name
    from pretrain.model import count_params

    t, m = cfg.train, cfg.model
    params, _ = count_params(m)
    fpt = flops_per_token(m, cfg.data.seq_len)
    accum = t.global_batch_tokens // (t.micro_batch_size * cfg.data.seq_len * strategy.data_world_size)
    budget = f"train.tokens={t.tokens:.3g}" if t.tokens is not None else "train.steps"
    precision = getattr(strategy, "precision", None)
    placement = strategy_name(cfg)
    if strategy.tensor_parallel > 1:
        placement += f" ({strategy.data_world_size} data-parallel)"
    threads = configure_threads()
    mix = ", ".join(f"{s} {w / sum(train_data.weights):.0%}" for s, w in zip(train_data.sources, train_data.weights))
    start = f"resumed from {resume_from} at step {step:,}" if resume_from is not None else "a new run"
    if t.init_from and resume_from is None:
        start += f", weights from {t.init_from}"
    lines = [
        f"== {cfg.name}: {start}",
        f"   model     {params:,} parameters ({m.n_layers} layers, dim {m.dim}), {fpt:.3g} FLOPs/token at "
        f"seq {cfg.data.seq_len}",
        f"   budget    {t.steps:,} steps x {t.global_batch_tokens:,} tokens = {t.steps * t.global_batch_tokens:,} "
        f"tokens ({budget}); micro-batch {t.micro_batch_size}, {accum} per step per rank",
        f"   placement {placement} on {strategy.world_size} x {strategy.device.type}"
        f"{f' (rank 0: {strategy.device})' if strategy.device.index is not None else ''}, "
        f"precision {precision.value if precision is not None else 'n/a'}, activation checkpointing "
        f"{t.activation_checkpointing.value}; {threads}",
        *([f"   adapter   {describe_adapter(cfg)}"] if cfg.peft.method != "none" else []),
        f"   data      {mix}; held out: {', '.join(val_sets) or 'none'}",
        f"   run       {t.run_dir} (checkpoints every {t.save_every or 'end'} steps, keep {t.keep_last})",
    ]
    return "\n".join(lines)
