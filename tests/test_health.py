"""A long multi-node run's health: every rank's figures in the log, and a hung rank found and named."""

import json
import os
import signal
import time

import pytest
from test_distributed import free_port, losses, run_distributed

from conftest import start_ranks, tiny_config


def _stopping_worker(rank: int, world_size: int, port: int, tiny_data: dict, run_dir, overrides: list) -> None:
    """A rank of a 2-rank FSDP run; rank 1 stops itself (SIGSTOP, as a hung node would) during step 3."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    import pretrain.trainer as trainer_mod
    from pretrain.trainer import train

    if rank == 1:
        real, calls = trainer_mod.lm_loss, {"n": 0}

        def lm_loss(*args):
            calls["n"] += 1
            if calls["n"] == 2 * 2 + 1:  # the first micro-batch of step 3
                os.kill(os.getpid(), signal.SIGSTOP)
            return real(*args)

        trainer_mod.lm_loss = lm_loss
    train(tiny_config(tiny_data, run_dir, "train.strategy=fsdp", *overrides))


@pytest.mark.parametrize("how", ["timeout", "sigterm"])
def test_a_stopped_rank_is_named_and_the_others_exit_within_the_timeout(tiny_data, tmp_path, how):
    # "sigterm": a SIGTERM to rank 0 while it is blocked in a collective with rank 1, before the timeout
    run_dir, timeout = tmp_path / "run", 5 if how == "timeout" else 24  # sigterm: ends after 12 s, not 24
    overrides = ["train.steps=6", "train.micro_batch_size=2", f"train.hang_timeout_s={timeout}"]
    context = start_ranks(_stopping_worker, (2, free_port(), tiny_data, run_dir, overrides), 2)
    rank0, rank1 = context.processes
    try:
        deadline, stopped_at = time.monotonic() + 120, None
        while rank0.is_alive() and time.monotonic() < deadline:
            if stopped_at is None and _is_stopped(rank1.pid):
                stopped_at = time.monotonic()
                if how == "sigterm":
                    time.sleep(1)  # rank 0 blocked in the step's collective by now
                    os.kill(rank0.pid, signal.SIGTERM)
            time.sleep(0.2)
        assert not rank0.is_alive(), "rank 0 still blocked after 120 s"
        assert stopped_at is not None and rank0.exitcode == 3
        assert time.monotonic() - stopped_at < (timeout if how == "timeout" else timeout / 2) + 30
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    report = (run_dir / "hangs" / "rank00000.txt").read_text()
    first = report.splitlines()[0]
    why = "no progress for" if how == "timeout" else "signalled"
    assert first.startswith("HANG rank 0 (") and why in first and "in step 3" in first, first
    assert "stuck: rank 1 (" in first  # the stopped rank wrote no report of its own
    assert "Thread" in report and "File " in report  # every thread's stack
    assert not (run_dir / "hangs" / "rank00001.txt").exists()


def _is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T in /proc)."""
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] in ("T", "t")
    except OSError:
        return False


def test_every_ranks_step_time_data_wait_and_memory_are_logged(tiny_data, tmp_path):
    run_distributed(tiny_data, tmp_path / "run", "train.steps=3", "train.micro_batch_size=2", "train.hang_timeout_s=60")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 3 and len(losses(tmp_path / "run")) == 3
    for record in logged:
        assert record["slowest_rank"] in (0, 1) and record["slowest_rank_step_time_s"] > 0
        assert record["peak_mem_gb_max"] >= record["peak_mem_gb"] and record["data_wait_frac_max_rank"] in (0, 1)
    beats = sorted(p.name for p in (tmp_path / "run" / "heartbeats").iterdir())
    assert (
        beats == ["rank00000", "rank00001"]
        and (tmp_path / "run" / "heartbeats" / "rank00001").read_text().split()[0] == "3"
    )


def test_a_healthy_run_under_the_watchdog_equals_one_without(tiny_data, tmp_path):
    from pretrain.trainer import train

    train(tiny_config(tiny_data, tmp_path / "plain", "train.steps=3"))
    train(tiny_config(tiny_data, tmp_path / "watched", "train.steps=3", "train.hang_timeout_s=30"))
    assert losses(tmp_path / "watched") == losses(tmp_path / "plain")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was put back


@pytest.mark.parametrize("value", ["-1"])
def test_hang_timeout_is_checked(value):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.hang_timeout_s must be >= 0"):
        load_config("debug", [f"train.hang_timeout_s={value}"])


def test_a_throttled_gpu_is_named_by_its_clock_and_temperature(monkeypatch):
    """Under NCCL every rank's step is as slow as the slowest, so step times cannot name a throttled GPU: its SM
    clock and temperature (NVML, gathered with the step figures) do. Four ranks' figures as they would come."""
    import torch

    from pretrain.health import describe_ranks, gpu_health, rank_stats

    class Gathered:  # what the all-gather of four ranks returns; rank 2's GPU throttles at 1005 MHz, 88 C
        def gather(self, mine):
            gpus = [(1980.0, 61.0, 690.0), (1980.0, 63.0, 700.0), (1005.0, 88.0, 350.0), (1980.0, 62.0, 695.0)]
            return [(f"node{r // 2}", 1.2, 0.01, 40.0, gpus[r]) for r in range(4)]

    stats = rank_stats(Gathered(), 1.2, 0.01, 40.0, (1980.0, 61.0, 690.0))
    assert (stats["gpu_clock_mhz_min"], stats["gpu_clock_mhz_min_rank"]) == (1005.0, 2)
    assert (stats["gpu_temp_c_max"], stats["gpu_temp_c_max_rank"]) == (88.0, 2) and stats["gpu_power_w_min"] == 350.0
    line = describe_ranks(stats)
    assert "GPU clock min 1005 MHz (rank 2, median 1980) | temp max 88 C (rank 2)" in line, line
    assert gpu_health(torch.device("cpu")) is None  # the CPU: nothing to read, nothing logged
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: 1410)
    monkeypatch.setattr(torch.cuda, "temperature", lambda device: 70)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: 400_000)  # mW
    assert gpu_health(torch.device("cuda", 0)) == (1410.0, 70.0, 400.0)
