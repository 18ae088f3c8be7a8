"""Checkpoints: `<run>/checkpoints/step-00001000/`, written atomically, a `latest` pointer, keep last N.

The strategy writes model and optimizer state in its own form; this module adds what every strategy
shares (scheduler, data position, RNG of every rank, step, resolved config, code version, wandb run
id). A checkpoint is written under `step-XXXXXXXX.tmp` and renamed when complete; `latest` is updated
last, so a crash mid-save never damages the previous checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pretrain.config import ConfigError
from pretrain.parallel.base import Strategy

LATEST = "latest"


def code_version() -> str:
    """The git commit of this code (with `-dirty` for local changes), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("llama-pretrain")
        except PackageNotFoundError:
            return "unknown"


def rng_state() -> dict[str, Any]:
    """Every random generator this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so the rename publishes whole files."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run; each stateful part saves itself."""

    def __init__(self, run_dir: str | os.PathLike, strategy: Strategy, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.strategy, self.keep_last = strategy, keep_last
        self._pending: Optional[tuple[Path, Path, Any]] = None  # (tmp, final, future) of a background save

    def latest(self) -> Optional[Path]:
        """The checkpoint `latest` points to, if any."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "trainer.pt").is_file():
            raise FileNotFoundError(f"{pointer} points to {path}, which is not a complete checkpoint")
        return path

    def save(self, step: int, model, optimizer, state: dict[str, Any], asynchronous: bool = False) -> Path:
        """Write checkpoint `step`; `state` holds the common parts (scheduler, data, config, ...).

        With `asynchronous` the strategy writes model and optimizer in the background; the checkpoint
        is published (renamed, `latest` updated) by `poll` once every rank has finished, or by `wait`.
        """
        self.wait()
        final = self.dir / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        written = self.strategy.save(tmp, model, optimizer, asynchronous)
        torch.save(rng_state(), tmp / f"rng-rank{self.strategy.rank:05d}.pt")
        if self.strategy.is_main:
            torch.save({**state, "step": step, "code_version": code_version()}, tmp / "trainer.pt")
        if written is not None:
            self._pending = (tmp, final, written)
        else:
            self._publish(tmp, final)
        return final

    def poll(self) -> None:
        """Publish a background save that every rank has finished (call on all ranks at the same step)."""
        if self._pending is not None and not self.strategy.any(not self._pending[2].done()):
            self.wait()

    def wait(self) -> None:
        """Finish and publish the background save, if any."""
        if self._pending is None:
            return
        tmp, final, written = self._pending
        self._pending = None
        written.result()
        self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Flush `tmp` to disk, rename it to `final`, point `latest` at it, prune old checkpoints."""
        fsync_tree(tmp)
        self.strategy.barrier()
        if self.strategy.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.dir / f"{LATEST}.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.dir / LATEST)
            self._prune()
        self.strategy.barrier()

    def load(self, path: str | os.PathLike, model, optimizer, expect_model: Optional[dict] = None) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from `path`; return the common state.

        With `expect_model` (the `model` section of the config), a checkpoint of another shape is
        refused with the keys that differ, before any tensor is loaded.
        """
        path = Path(path)
        if not (path / "trainer.pt").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no trainer.pt)")
        state = torch.load(path / "trainer.pt", weights_only=False)
        if "scheduler" not in state:
            raise ConfigError(
                f"{path} holds weights only (imported from {state.get('imported_from', 'elsewhere')}), nothing to "
                f"resume: start a new run from it with train.init_from={path}"
            )
        if expect_model is not None:
            saved = state["config"]["model"]
            diff = [
                f"model.{k}: {saved.get(k)!r} there, {v!r} here" for k, v in expect_model.items() if saved.get(k) != v
            ]
            if diff:
                raise ConfigError(
                    f"{path} holds a different model ({'; '.join(diff)}); "
                    "set train.resume=never or another train.run_dir to start a new run"
                )
        self.strategy.load(path, model, optimizer)
        rng = path / f"rng-rank{self.strategy.rank:05d}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved: this rank keeps its seeded state
            set_rng_state(torch.load(rng, weights_only=False))
        return state

    def _prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints."""
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old)
