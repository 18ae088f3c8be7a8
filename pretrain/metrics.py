"""Throughput, MFU and where metrics go: the console, `<run>/metrics.jsonl`, wandb and TensorBoard.

tokens/sec/GPU = tokens of the whole optimizer step (all micro-batches, all ranks) / step wall time /
world size, averaged over the steps since the last log line. MFU = tokens/sec/GPU x FLOPs per token /
the device's dense bf16 peak (see `pretrain.model.flops_per_token`). An unknown device gets no MFU
unless `metrics.peak_flops` is set.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.shards import atomic_write_bytes
from pretrain.config import ConfigError, ExperimentConfig, to_dict

# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets (without sparsity).
PEAK_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The configured peak, else the data-sheet peak of a known GPU, else None (never a guess)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return PEAK_FLOPS["H100 PCIe"]
    for key in ("H200", "H100", "A100"):
        if key in name:
            return PEAK_FLOPS[key]
    return None


class ThroughputMeter:
    """Tokens and seconds since the last log line; the averages leave out the first steps."""

    def __init__(
        self, tokens_per_step: int, flops_per_token: int, world_size: int, peak_flops: Optional[float], skip_steps: int
    ):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak, self.skip_steps = world_size, peak_flops, skip_steps
        self.steps_done = 0
        self.total_tokens, self.total_time = 0, 0.0  # after the skipped steps
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a log line, an evaluation or a checkpoint)."""
        self.window_start, self.window_steps, self.data_time = time.perf_counter(), 0, 0.0

    def step(self, data_time: float) -> None:
        """Count one optimizer step and the seconds it waited for data."""
        self.window_steps += 1
        self.data_time += data_time

    def window(self) -> dict[str, Any]:
        """Throughput of the current window (call after a device sync, e.g. `.item()`)."""
        elapsed = time.perf_counter() - self.window_start
        steps = max(self.window_steps, 1)
        tps = self.tokens_per_step * self.window_steps / elapsed / self.world_size
        counted = max(0, self.steps_done + self.window_steps - max(self.skip_steps, self.steps_done))
        self.total_tokens += self.tokens_per_step * counted
        self.total_time += elapsed * counted / steps
        self.steps_done += self.window_steps
        flops = tps * self.flops_per_token
        return {
            "tokens_per_sec_per_gpu": tps,
            "tflops_per_gpu": flops / 1e12,
            "mfu": flops / self.peak if self.peak else None,
            "step_time_s": elapsed / steps,
            "data_wait_frac": self.data_time / elapsed,
        }

    def average(self) -> dict[str, Any]:
        """Mean throughput over all steps after the first `skip_steps`."""
        if self.total_time == 0:
            return {"tokens_per_sec_per_gpu": None, "mfu": None}
        tps = self.total_tokens / self.total_time / self.world_size
        return {"tokens_per_sec_per_gpu": tps, "mfu": tps * self.flops_per_token / self.peak if self.peak else None}


def wandb_mode(mode: str) -> str:
    """`auto` is online with WANDB_API_KEY in the environment, offline without."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


# Charts of these metrics get tokens seen as their x-axis (wandb's define_metric); the others keep the step.
TOKEN_AXIS_METRICS = ("loss", "val_loss", "val_ppl", "val_loss/*", "val_ppl/*", "lm_eval/*")

# W&B's multi-tenant cloud: it forks runs, and rewinds them where W&B enabled it (a private preview). Self-managed
# servers do neither; an offline run meets its server only at `wandb sync`.
WANDB_CLOUD = "https://api.wandb.ai"


def server_last_step(mode: str, entity: Optional[str], project: str, run_id: str) -> Optional[int]:
    """The last step of `run_id` on a server that can branch runs (W&B's cloud; -1: no history); None offline, on
    any other server, or when the server does not answer."""
    if mode != "online":
        return None
    import wandb

    try:
        api = wandb.Api()
        if api.settings["base_url"] != WANDB_CLOUD:
            return None
        return api.run(f"{entity or api.default_entity}/{project}/{run_id}").lastHistoryStep
    except Exception as e:  # no such run (it never reached the server), no network
        print(f"wandb: the server gave no last step of run {run_id} ({e})", flush=True)
        return None


def wandb_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """What wandb gets of a metrics.jsonl record: its values but `step` and nulls; an event's as `events/<name>` = 1
    and its numeric fields as `events/<name>/<field>`."""
    if "event" not in record:
        return {k: v for k, v in record.items() if v is not None and k != "step"}
    name = record["event"]
    fields = {k: v for k, v in record.items() if k not in ("step", "event") and _is_number(v)}
    return {f"events/{name}": 1, **{f"events/{name}/{k}": v for k, v in fields.items()}}


def new_run_id() -> str:
    """A fresh wandb run id (as the trainer makes one)."""
    return uuid.uuid4().hex[:12]


class MetricLogger:
    """One record per log step, to the console, metrics.jsonl, wandb and TensorBoard (rank 0 only).

    On a resume from a checkpoint at step S, and on `rewind(S)` (a rollback), every history goes back to S:
    metrics.jsonl keeps the records of steps <= S, TensorBoard purges the events after S, and wandb gets a run whose
    history is metrics.jsonl up to S. metrics.jsonl is the source of truth (written and flushed at every log step):
    wandb may lack rows a killed process never wrote out (offline it writes whole 32 KiB blocks), so the rows after
    the point where wandb's history surely agrees with it are sent again from it. Where that point is depends on
    the server (`server_last_step`):

    - W&B's cloud: B = min(S - 1, the last step it holds); the run is forked at B (`fork_from`, a new id; W&B
      recommends fork) or, with `wandb.history=rewind`, rewound to B (`resume_from`, the same id; where W&B enabled
      that preview) and forked where that fails; else a new run;
      the rows after B are sent again (row S too, so that a rollback event at S joins it, as in metrics.jsonl).
    - Offline and on other servers (self-managed: neither rewind nor fork), nothing to branch from: the run carries
      the whole history, every row sent again. Offline with `auto` or `rewind`, it keeps its id and the earlier
      segments of that id move to `<run>/wandb/superseded`, so `wandb sync` uploads one run whatever the server;
      otherwise
      (`fork`, a segment of that id synced already, or online) it is a new run.

    A new id is `run_id` from then on: the trainer saves it in its checkpoints.
    """

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, run_id: str, resume_step: int, enabled: bool = True):
        self.enabled, self.path, self.run_dir, self.cfg = enabled, run_dir / "metrics.jsonl", run_dir, cfg
        self.run_id = run_id
        self.run, self.tensorboard = None, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.mode = wandb_mode(cfg.wandb.mode)
        if self.mode != "disabled":
            self._start_wandb(resume_step)
        if cfg.metrics.tensorboard:
            self._start_tensorboard(resume_step)

    def _start_wandb(self, step: int) -> None:
        """A wandb run whose history is metrics.jsonl (already cut at `step`): new at step 0, else branched where
        the server allows it (see the class docstring), and the rows wandb may lack sent again."""
        import wandb

        w = self.cfg.wandb
        common = dict(
            project=w.project,
            entity=w.entity,
            name=self.cfg.name,
            group=w.group,
            job_type=w.job_type,
            notes=w.notes,
            dir=str(self.run_dir),
            config=to_dict(self.cfg),
            mode=self.mode,
            tags=list(w.tags),
        )
        branches, base, keep_id = [], 0, False
        last = server_last_step(self.mode, w.entity, w.project, self.run_id) if step else None
        if last is not None:
            base = max(0, min(step - 1, last))
            if w.history == "rewind":
                branches.append(("rewind", dict(resume_from=f"{self.run_id}?_step={base}")))
            branches.append(("fork", dict(id=new_run_id(), fork_from=f"{self.run_id}?_step={base}")))
        for n, (how, kwargs) in enumerate(branches):
            try:
                self.run = wandb.init(**kwargs, **common)
                break
            except Exception as e:  # rewind not enabled for this account; a run the server never saw
                then = branches[n + 1][0] if n + 1 < len(branches) else "a new run"
                print(f"wandb: {how} of run {self.run_id} at step {base} failed ({e}); trying {then}", flush=True)
        else:  # nothing to branch from: a run that carries the whole history
            how, base = "new run", 0
            keep_id = step == 0 or (
                self.mode == "offline" and w.history in ("auto", "rewind") and self._set_aside(self.run_id)
            )
            ident = dict(id=self.run_id, resume="allow") if keep_id else dict(id=new_run_id())
            self.run = wandb.init(**ident, **common)
        self.run.define_metric("tokens_seen")
        for pattern in TOKEN_AXIS_METRICS:
            self.run.define_metric(pattern, step_metric="tokens_seen")
        if step:
            sent = self._send_again(base)
            if how != "new run":
                origin = f"{how} of run {self.run_id} at step {base}"
            else:
                origin = "its earlier offline segments moved to wandb/superseded" if keep_id else "a new run"
            print(f"wandb: run {self.run.id} ({origin}): {sent} records of metrics.jsonl sent again", flush=True)
        self.run_id = self.run.id

    def _send_again(self, after: int) -> int:
        """Log the records of metrics.jsonl after step `after` to wandb again; returns how many."""
        records = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []
        records = [r for r in records if r["step"] > after]
        for record in records:
            self.run.log(wandb_scalars(record), step=record["step"])
        return len(records)

    def _set_aside(self, run_id: str) -> bool:
        """Move the offline segments of `run_id` to <run>/wandb/superseded, out of `wandb sync`'s reach (the next
        segment carries their history); False, moving nothing, if one was synced already (the server has it)."""
        wandb_dir = self.run_dir / "wandb"
        files = list(wandb_dir.glob(f"offline-run-*/run-{run_id}.wandb"))
        if any(f.with_suffix(".wandb.synced").exists() for f in files):
            return False
        for segment in (f.parent for f in files):
            target, n = wandb_dir / "superseded" / segment.name, 0
            while target.exists():  # set aside before (a name reused after a rollback)
                n += 1
                target = wandb_dir / "superseded" / f"{segment.name}.{n}"
            target.parent.mkdir(exist_ok=True)
            segment.rename(target)
        return True

    def _start_tensorboard(self, step: int) -> None:
        """Event files in <run>/tensorboard; events after `step` left by an earlier run are purged."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "metrics.tensorboard=true needs the tensorboard package: pip install 'llama-pretrain[tensorboard]'"
            ) from None
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (left by a run that died after its last checkpoint)."""
        if not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = []
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # half-written by a process that died mid-line
                    break
                raise ValueError(f"{self.path}:{n}: not a JSON object; fix or move the file to resume") from None
            if record["step"] <= step:
                kept.append(line)
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode("utf-8"))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record everywhere (`tokens_seen`, if missing, is step x train.global_batch_tokens)."""
        if not self.enabled:
            return
        step = record["step"]
        record = {**record, "tokens_seen": record.get("tokens_seen", step * self.cfg.train.global_batch_tokens)}
        self._write(record)
        print(format_record(record), flush=True)

    def event(self, step: int, name: str, fields: Optional[dict[str, Any]] = None) -> None:
        """Record an event (e.g. a rollback): `{"step", "event": name, **fields}` in metrics.jsonl; in wandb and
        TensorBoard `events/<name>` = 1 and its numeric fields as `events/<name>/<field>`, and on the console.

        After `rewind(S)`, log the rollback at step S or later (wandb's row S was sent again: it joins that row).
        """
        if not self.enabled:
            return
        fields = dict(fields or {})
        record = {"step": step, "event": name, **fields}
        self._write(record)
        print(format_record(record), flush=True)
        if self.run is not None and self.mode == "online":
            import wandb

            text = ", ".join(f"{k} {v}" for k, v in fields.items())
            self.run.alert(title=f"{name} at step {step}", text=text or name, level=wandb.AlertLevel.WARN)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step, scalars = record["step"], wandb_scalars(record)
        if self.run is not None:
            self.run.log(scalars, step=step)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if _is_number(value):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def rewind(self, step: int) -> None:
        """Go back to `step` (a rollback to its checkpoint): every history keeps the steps up to `step` only."""
        if not self.enabled:
            return
        self._truncate_after(step)
        if self.run is not None:
            self.run.finish()
            self._start_wandb(step)
        if self.tensorboard is not None:
            self.tensorboard.close()
            self._start_tensorboard(step)

    def wandb_location(self) -> str:
        """Where the wandb run can be seen."""
        if self.run is None:
            return "disabled"
        if self.run.settings.mode == "offline":  # one folder per start (resumes, rollbacks): sync them together
            segments = self.run_dir / "wandb" / "offline-run-*"
            return f"offline in {Path(self.run.dir).parent} (upload: wandb sync {segments})"
        return self.run.url or "online"

    def close(self) -> None:
        """Finish the wandb run, close the TensorBoard writer."""
        if self.run is not None:
            self.run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_record(r: dict[str, Any]) -> str:
    """A console line for a training, evaluation or event record."""
    if "event" in r:
        fields = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("step", "event"))
        return f"step {r['step']:>6} | event {r['event']}" + (f" | {fields}" if fields else "")
    if "val_loss" in r:
        per_source = ", ".join(f"{k[9:]} {v:.3f}" for k, v in r.items() if k.startswith("val_loss/"))
        return (
            f"step {r['step']:>6} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}"
            + (f" | {per_source}" if per_source else "")
            + (f" | {r['eval_time_s']:.1f} s" if "eval_time_s" in r else "")
        )
    if "loss" not in r:  # e.g. benchmark scores
        fields = " | ".join(f"{k} {v:.4g}" if _is_number(v) else f"{k} {v}" for k, v in r.items() if k != "step")
        return f"step {r['step']:>6} | {fields}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
        f"{r['tokens_per_sec_per_gpu']:,.0f} tok/s/gpu | MFU {mfu} | {r['tflops_per_gpu']:.2f} TFLOP/s | "
        f"{r['step_time_s'] * 1000:.0f} ms/step | data {100 * r['data_wait_frac']:.1f}% | "
        f"mem {r['peak_mem_gb']:.2f} GB | {human_count(r['tokens_seen'])} tokens"
        + (f" | ETA {duration(r['eta_s'])}" if r.get("eta_s") is not None else "")
    )


def duration(seconds: float) -> str:
    """4000 -> '1h06m', 75 -> '1m15s', 8.2 -> '8s'."""
    seconds = int(round(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def human_count(n: float) -> str:
    """1234 -> '1.2k', 5_600_000 -> '5.60M', 3.1e9 -> '3.10B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(int(n))


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range."""
    return math.exp(loss) if loss < 700 else float("inf")
