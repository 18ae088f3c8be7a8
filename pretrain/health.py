"""Each rank's health in a long multi-node run: what every rank measured at a log step, and a hang watchdog.

`rank_stats` gathers, at each log step, every rank's step time, data wait, peak memory and host, so the
slowest rank and the rank nearest its memory limit are named in the log, not only rank 0's figures. On GPUs
it gathers each GPU's SM clock, temperature and power draw too (`gpu_health`, NVML through torch.cuda): under
NCCL the ranks wait for each other inside every step, so a throttled GPU makes every rank's step slow alike,
and its low clock (or high temperature) is what names it, as in Megatron-LM's straggler detector.

`HangWatchdog` (`train.hang_timeout_s` > 0) is a thread on every rank. The trainer beats it after each step,
evaluation and save, and each beat also writes the rank's step to `<run_dir>/heartbeats/rank<N>` (the run
folder is shared by the ranks). When no beat comes for `hang_timeout_s` (a rank stopped, a collective that
never completes), the watchdog writes every thread's Python stack (faulthandler) and the frame the main
thread waits in to stderr and to `<run_dir>/hangs/rank<N>.txt`, names the stuck ranks (those whose watchdog
wrote no report: a stopped or dead process; else those whose heartbeat is behind), and ends the process
with exit code 3, so that
the launcher stops the job and the scheduler restarts it. A SIGTERM or SIGINT that arrives while the main
thread is blocked in a collective (its Python handler cannot run then) is seen through the signal wakeup fd:
when the step does not end within 30 s of it (or half `hang_timeout_s`, if shorter), the watchdog ends the
process the same way.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

HANG_EXIT_CODE = 3
PREEMPTION_GRACE_S = 30.0  # a signalled rank whose step does not end within this (or timeout / 2) is stuck


def gpu_health(device) -> Optional[tuple[float, float, float]]:
    """(SM clock MHz, temperature C, power W) of GPU `device` from NVML (torch.cuda's pynvml calls; about 0.1 ms
    each), or None on the CPU or without NVML."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    try:
        return (
            float(torch.cuda.clock_rate(device)),
            float(torch.cuda.temperature(device)),
            torch.cuda.power_draw(device) / 1000.0,  # mW
        )
    except Exception:  # no pynvml / amdsmi, or a GPU NVML cannot read
        return None


def rank_stats(
    strategy, step_time_s: float, data_wait_frac: float, peak_mem_gb: float, gpu: Optional[tuple] = None
) -> dict[str, Any]:
    """Every rank's step time, data wait and peak memory, and `gpu` (`gpu_health`) when every rank has one,
    gathered (one small all-gather); the slowest rank and its lag over the median, the most data-starved rank,
    the highest peak memory, and the lowest GPU clock, highest temperature and their ranks. Empty on one
    process."""
    rows = strategy.gather((socket.gethostname(), step_time_s, data_wait_frac, peak_mem_gb, gpu))
    if len(rows) < 2:
        return {}
    times, waits, mems = ([row[i] for row in rows] for i in (1, 2, 3))
    slowest, starved, fullest = (max(range(len(rows)), key=v.__getitem__) for v in (times, waits, mems))
    median = statistics.median(times)
    gpus = {}
    if all(row[4] is not None for row in rows):
        clocks, temps, powers = ([row[4][i] for row in rows] for i in range(3))
        lowest = min(range(len(rows)), key=clocks.__getitem__)
        hottest = max(range(len(rows)), key=temps.__getitem__)
        gpus = {
            "gpu_clock_mhz_min": clocks[lowest],
            "gpu_clock_mhz_min_rank": lowest,
            "gpu_clock_mhz_median": statistics.median(clocks),
            "gpu_temp_c_max": temps[hottest],
            "gpu_temp_c_max_rank": hottest,
            "gpu_power_w_min": min(powers),
        }
    return {
        **gpus,
        "slowest_rank": slowest,
        "slowest_rank_step_time_s": times[slowest],
        "slowest_rank_lag": times[slowest] / median - 1 if median > 0 else 0.0,
        "data_wait_frac_max": waits[starved],
        "data_wait_frac_max_rank": starved,
        "peak_mem_gb_max": mems[fullest],
        "peak_mem_gb_max_rank": fullest,
        "hosts": [row[0] for row in rows],  # for the log line; not a metric
    }


def describe_ranks(stats: dict[str, Any]) -> Optional[str]:
    """One log line about the ranks (slowest, most data-starved, most memory), or None on one process."""
    if not stats:
        return None
    hosts = stats["hosts"]
    return (
        f"ranks | slowest {stats['slowest_rank']} ({hosts[stats['slowest_rank']]}) "
        f"{stats['slowest_rank_step_time_s'] * 1000:.0f} ms/step, {100 * stats['slowest_rank_lag']:+.0f}% vs median"
        f" | data wait max {100 * stats['data_wait_frac_max']:.1f}% (rank {stats['data_wait_frac_max_rank']})"
        f" | peak mem max {stats['peak_mem_gb_max']:.2f} GB (rank {stats['peak_mem_gb_max_rank']})"
        + (
            f" | GPU clock min {stats['gpu_clock_mhz_min']:.0f} MHz (rank {stats['gpu_clock_mhz_min_rank']}, "
            f"median {stats['gpu_clock_mhz_median']:.0f}) | temp max {stats['gpu_temp_c_max']:.0f} C "
            f"(rank {stats['gpu_temp_c_max_rank']})"
            if "gpu_clock_mhz_min" in stats
            else ""
        )
    )


class HangWatchdog:
    """A thread that ends this rank when no step, evaluation or save finishes for `timeout_s` (see above)."""

    def __init__(self, timeout_s: float, run_dir: str | os.PathLike, rank: int, world_size: int):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.grace_s = min(PREEMPTION_GRACE_S, timeout_s / 2)  # a signalled step that outlasts this is stuck
        self.run_dir = Path(run_dir)
        self.heartbeats = self.run_dir / "heartbeats"
        self.host = socket.gethostname()
        self.step, self.what = 0, "starting"
        self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wakeup: Optional[tuple[int, int]] = None
        self._previous_wakeup = -1
        self._signalled_at: Optional[float] = None
        self._main = threading.main_thread()

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        """Start watching (from the main thread, where the signal wakeup fd is set)."""
        if not self.enabled:
            return
        self.heartbeats.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is self._main:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = (read, write)
        self.beat(self.step, "the first step")
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, next_what: str = "the next step") -> None:
        """The main thread got through `step`; `next_what` is what it does now (said if it never ends)."""
        if not self.enabled:
            return
        self.step, self.what, self.last_beat = step, next_what, time.monotonic()
        self._signalled_at = None
        tmp = self.heartbeats / f".rank{self.rank:05d}.tmp"
        tmp.write_text(f"{step} {time.time():.3f} {self.host}\n")
        os.replace(tmp, self.heartbeats / f"rank{self.rank:05d}")

    def stop(self) -> None:
        """Stop watching; put back the signal wakeup fd."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _watch(self) -> None:
        poll = min(5.0, max(self.timeout_s / 4, 0.2))
        while not self._stop.is_set():
            if self._wakeup is not None:
                ready, _, _ = select.select([self._wakeup[0]], [], [], poll)
                if ready:
                    received = os.read(self._wakeup[0], 64)
                    if any(b in (signal.SIGTERM, signal.SIGINT) for b in received):  # USR1: minutes ahead
                        self._signalled_at = self._signalled_at or time.monotonic()
            else:
                self._stop.wait(poll)
            if self._stop.is_set():
                return
            now = time.monotonic()
            if now - self.last_beat > self.timeout_s:
                self._fire(f"no progress for {now - self.last_beat:.0f} s (train.hang_timeout_s={self.timeout_s:g})")
            elif self._signalled_at is not None and now - self._signalled_at > self.grace_s:
                self._fire(f"signalled {now - self._signalled_at:.0f} s ago, and the step never ended to save")

    def silent(self) -> list[str]:
        """The ranks whose watchdog left no hang report (`hangs/rank<N>.txt`): stopped, dead, or stuck holding
        the interpreter, while the others, blocked in a collective with them, wrote theirs."""
        reports = self.run_dir / "hangs"
        missing = [r for r in range(self.world_size) if not (reports / f"rank{r:05d}.txt").exists()]
        return [f"rank {r} ({self._host_of(r)})" for r in missing]

    def _host_of(self, rank: int) -> str:
        try:
            return (self.heartbeats / f"rank{rank:05d}").read_text().split()[2]
        except (OSError, IndexError):
            return "host unknown"

    def behind(self) -> list[str]:
        """The ranks whose heartbeat is the oldest step (the stuck ones), as `rank N (host) at step S`."""
        beats = {}
        for rank in range(self.world_size):
            path = self.heartbeats / f"rank{rank:05d}"
            try:
                step, _, host = path.read_text().split()
                beats[rank] = (int(step), host)
            except (OSError, ValueError):
                beats[rank] = (-1, "no heartbeat")
        oldest = min(step for step, _ in beats.values())
        if all(step == oldest for step, _ in beats.values()):
            return []
        return [f"rank {rank} ({host}) at step {step}" for rank, (step, host) in beats.items() if step == oldest]

    def _fire(self, why: str) -> None:
        """Write this rank's report, wait a few polls for the other ranks' reports, then say which ranks are
        stuck (silent, or behind in steps) and where this one waits, dump every thread's stack, and end."""
        frame = sys._current_frames().get(self._main.ident)
        waiting = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})" if frame else "?"
        head = f"HANG rank {self.rank} ({self.host}): {why}, after step {self.step}, in {self.what}"
        reports = self.run_dir / "hangs"
        report = reports / f"rank{self.rank:05d}.txt"
        try:
            reports.mkdir(parents=True, exist_ok=True)
            report.write_text(head + "\n")
        except OSError:
            pass
        time.sleep(min(2 * max(self.timeout_s / 4, 0.2), 10.0) + 1.0)  # the other ranks' watchdogs report too
        stuck = self.silent() or self.behind()
        blame = f"; stuck: {', '.join(stuck)}" if stuck else "; every rank reported at the same step"
        line = (
            f"{head}; its main thread waits in {waiting}{blame}. Stacks below and in {reports}; exiting with code "
            f"{HANG_EXIT_CODE} so that the job is restarted"
        )
        print(line, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            with open(report, "w") as f:
                f.write(line + "\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        os._exit(HANG_EXIT_CODE)
