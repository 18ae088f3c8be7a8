"""Throughput, MFU and where metrics go: the console, `<run>/metrics.jsonl` and wandb.

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
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.shards import atomic_write_bytes
from pretrain.config import ExperimentConfig, to_dict

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


class MetricLogger:
    """One record per log step, to the console, metrics.jsonl and wandb (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, run_id: str, resume_step: int, enabled: bool = True):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=to_dict(cfg),
                mode=mode,
                tags=list(cfg.wandb.tags),
            )

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
        """Write one record everywhere."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
        print(format_record(record), flush=True)

    def wandb_location(self) -> str:
        """Where the wandb run can be seen."""
        if self.run is None:
            return "disabled"
        if self.run.settings.mode == "offline":
            return f"offline in {Path(self.run.dir).parent} (upload: wandb sync {Path(self.run.dir).parent})"
        return self.run.url or "online"

    def close(self) -> None:
        """Finish the wandb run."""
        if self.run is not None:
            self.run.finish()


def format_record(r: dict[str, Any]) -> str:
    """A console line for a training or evaluation record."""
    if "val_loss" in r:
        return f"step {r['step']:>6} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
        f"{r['tokens_per_sec_per_gpu']:,.0f} tok/s/gpu | MFU {mfu} | {r['tflops_per_gpu']:.2f} TFLOP/s | "
        f"{r['step_time_s'] * 1000:.0f} ms/step | data {100 * r['data_wait_frac']:.1f}% | "
        f"mem {r['peak_mem_gb']:.2f} GB | {human_count(r['tokens_seen'])} tokens"
    )


def human_count(n: float) -> str:
    """1234 -> '1.2k', 5_600_000 -> '5.60M', 3.1e9 -> '3.10B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(int(n))


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range."""
    return math.exp(loss) if loss < 700 else float("inf")
