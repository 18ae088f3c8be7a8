"""Distributed strategies against one process: 2 ranks on CPU with gloo."""

import json
import math
import os
import socket
import time

import pytest
import torch.multiprocessing as mp

from conftest import tiny_config
from pretrain.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tiny_data: dict, run_dir, overrides: list, inject=None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    import torch.distributed as dist

    if inject is not None and inject[0] == rank:  # (rank, call of the loss function, "sigterm" | "nan")
        import signal

        import pretrain.trainer as trainer_mod

        real, calls = trainer_mod.lm_loss, {"n": 0}

        def lm_loss(*args):
            calls["n"] += 1
            if calls["n"] == inject[1] and inject[2] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            loss = real(*args)
            return loss * float("nan") if calls["n"] == inject[1] and inject[2] == "nan" else loss

        trainer_mod.lm_loss = lm_loss

    try:
        train(tiny_config(tiny_data, run_dir, *overrides))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(tiny_data: dict, run_dir, *overrides: str, world_size: int = 2, inject=None) -> None:
    """Train on `world_size` CPU processes (gloo), with FSDP unless the overrides name another strategy.

    Fails, rather than hangs, when the ranks have not all finished within two minutes.
    """
    overrides = ("train.strategy=fsdp", *overrides)
    args = (world_size, free_port(), tiny_data, run_dir, list(overrides), inject)
    context = mp.start_processes(_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after 120 s: {overrides}")


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


STRATEGIES = {
    "fsdp": ["train.strategy=fsdp"],
    "zero0": ["train.strategy=deepspeed", "train.zero_stage=0"],
    "zero1": ["train.strategy=deepspeed", "train.zero_stage=1"],
    "zero2": ["train.strategy=deepspeed", "train.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.zero_stage=3"],
}
CASES = [(s, c) for s in STRATEGIES for c in ("none", "full")] + [("fsdp", "selective"), ("zero3", "selective")]


@pytest.mark.parametrize("strategy,checkpointing", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_two_ranks_match_one_process(tiny_data, tmp_path, strategy, checkpointing):
    # 8 samples a step in micro-batches of 2: 4 micro-batches on one process, 2 per rank on two
    common = ["train.steps=5", "train.micro_batch_size=2", f"train.activation_checkpointing={checkpointing}"]
    train(tiny_config(tiny_data, tmp_path / "single", *common))
    run_distributed(tiny_data, tmp_path / "dist", *STRATEGIES[strategy], *common)
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert len(losses(tmp_path / "dist")) == 5
    last = json.loads((tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(v for k, v in last.items() if k.startswith("tokens_seen/")) == last["tokens_seen"]  # all ranks


def test_hsdp_two_replicas_match_one_process(tiny_data, tmp_path):
    common = ["train.steps=5", "train.micro_batch_size=2"]
    train(tiny_config(tiny_data, tmp_path / "single", *common))
    hsdp = ["train.fsdp_shard_size=1", "train.reshard_after_forward=false"]  # 2 replicas of 1 shard
    run_distributed(tiny_data, tmp_path / "hsdp", *hsdp, *common)
    assert losses(tmp_path / "hsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "zero2", "zero3"])
def test_resume_continues_the_unbroken_run(tiny_data, tmp_path, strategy):
    run_distributed(tiny_data, tmp_path / "straight", *STRATEGIES[strategy], "train.steps=6")
    run_distributed(tiny_data, tmp_path / "broken", *STRATEGIES[strategy], "train.steps=6", "train.stop_at=3")
    assert (tmp_path / "broken" / "checkpoints" / "latest").read_text() == "step-00000003"
    run_distributed(tiny_data, tmp_path / "broken", *STRATEGIES[strategy], "train.steps=6")
    assert losses(tmp_path / "broken") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    assert len(losses(tmp_path / "broken")) == 6


def test_fsdp_resumes_on_another_number_of_ranks(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "straight", "train.steps=6"))
    run_distributed(tiny_data, tmp_path / "2to1", "train.steps=6", "train.stop_at=3")
    train(tiny_config(tiny_data, tmp_path / "2to1", "train.steps=6"))  # `single` reads the FSDP checkpoint
    train(tiny_config(tiny_data, tmp_path / "1to2", "train.steps=6", "train.stop_at=3"))
    run_distributed(tiny_data, tmp_path / "1to2", "train.steps=6")
    for run in ("2to1", "1to2"):
        assert losses(tmp_path / run) == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)
        last = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
        assert sum(v for k, v in last.items() if k.startswith("tokens_seen/")) == last["tokens_seen"]


def test_deepspeed_on_another_number_of_ranks_says_what_to_do(tiny_data, tmp_path):
    run_distributed(tiny_data, tmp_path / "run", *STRATEGIES["zero3"], "train.steps=6", "train.stop_at=2")
    with pytest.raises(Exception, match="ZeRO-3 state of 2 ranks; this run is ZeRO-3 on 1"):
        run_distributed(tiny_data, tmp_path / "run", *STRATEGIES["zero3"], "train.steps=6", world_size=1)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_nan_on_one_rank_stops_or_skips_on_all_ranks(tiny_data, tmp_path, strategy, on_nan):
    run = tmp_path / "run"
    args = (*STRATEGIES[strategy], "train.steps=5", "train.micro_batch_size=2", f"train.on_nan={on_nan}")
    if on_nan == "stop":  # a NaN in rank 1's second micro-batch of step 3: both ranks raise, none hangs
        with pytest.raises(Exception, match="NonFiniteLoss: step 3: loss nan"):
            run_distributed(tiny_data, run, *args, inject=(1, 6, "nan"))
        return
    run_distributed(tiny_data, run, *args, inject=(1, 6, "nan"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # rank 0 skipped rank 1's bad step with it
    assert math.isnan(records[2]["loss"]) and records[4]["skipped_steps"] == 1
    assert math.isfinite(records[4]["loss"]) and math.isfinite(records[4]["grad_norm"])


def test_sigterm_on_one_rank_stops_all_at_the_same_step_and_resumes(tiny_data, tmp_path):
    run_distributed(tiny_data, tmp_path / "straight", "train.steps=6")
    run_distributed(tiny_data, tmp_path / "run", "train.steps=6", inject=(1, 3, "sigterm"))  # rank 1, in step 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    run_distributed(tiny_data, tmp_path / "run", "train.steps=6")
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


LAUNCH_HINTS = [("fsdp", "torchrun --nproc_per_node"), ("deepspeed", "deepspeed --num_gpus")]


@pytest.mark.parametrize("strategy,hint", LAUNCH_HINTS)
def test_without_a_launcher_the_error_says_how_to_launch(tiny_data, tmp_path, monkeypatch, strategy, hint):
    from pretrain.config import ConfigError

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match=hint):
        train(tiny_config(tiny_data, tmp_path, f"train.strategy={strategy}"))
