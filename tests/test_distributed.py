"""Distributed strategies against one process: 2 ranks on CPU with gloo."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from conftest import tiny_config
from pretrain.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tiny_data: dict, run_dir, overrides: list, sigterm=None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    import torch.distributed as dist

    if sigterm is not None and sigterm[0] == rank:  # (rank, call of the loss function) that gets SIGTERM
        import signal

        import pretrain.trainer as trainer_mod

        real, calls = trainer_mod.lm_loss, {"n": 0}

        def lm_loss(*args):
            calls["n"] += 1
            if calls["n"] == sigterm[1]:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args)

        trainer_mod.lm_loss = lm_loss

    try:
        train(tiny_config(tiny_data, run_dir, "train.strategy=fsdp", *overrides))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(tiny_data: dict, run_dir, *overrides: str, world_size: int = 2, sigterm=None) -> None:
    """Train with FSDP on `world_size` CPU processes (gloo)."""
    mp.spawn(_worker, args=(world_size, free_port(), tiny_data, run_dir, list(overrides), sigterm), nprocs=world_size)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(
    "extra",
    [[], ["train.activation_checkpointing=full"], ["train.fsdp_shard_size=1", "train.reshard_after_forward=false"]],
    ids=["plain", "checkpointed", "hsdp"],
)
def test_fsdp_two_ranks_match_one_process(tiny_data, tmp_path, extra):
    # 8 samples a step in micro-batches of 2: 4 micro-batches on one process, 2 per rank on two
    common = ["train.steps=5", "train.micro_batch_size=2", *extra]
    train(tiny_config(tiny_data, tmp_path / "single", *common))
    run_distributed(tiny_data, tmp_path / "fsdp", *common)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert len(losses(tmp_path / "fsdp")) == 5
    last = json.loads((tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(v for k, v in last.items() if k.startswith("tokens_seen/")) == last["tokens_seen"]  # all ranks


def test_fsdp_resume_continues_the_unbroken_run(tiny_data, tmp_path):
    run_distributed(tiny_data, tmp_path / "straight", "train.steps=6")
    run_distributed(tiny_data, tmp_path / "broken", "train.steps=6", "train.stop_at=3")
    assert (tmp_path / "broken" / "checkpoints" / "step-00000003" / "dcp").is_dir()
    run_distributed(tiny_data, tmp_path / "broken", "train.steps=6")
    assert losses(tmp_path / "broken") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


def test_sigterm_on_one_rank_stops_all_at_the_same_step_and_resumes(tiny_data, tmp_path):
    run_distributed(tiny_data, tmp_path / "straight", "train.steps=6")
    run_distributed(tiny_data, tmp_path / "run", "train.steps=6", sigterm=(1, 3))  # rank 1, in step 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    run_distributed(tiny_data, tmp_path / "run", "train.steps=6")
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


def test_fsdp_without_a_launcher_says_how_to_launch(tiny_data, tmp_path, monkeypatch):
    from pretrain.config import ConfigError

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        train(tiny_config(tiny_data, tmp_path, "train.strategy=fsdp"))
