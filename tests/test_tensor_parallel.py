"""Tensor + sequence parallel (train.tensor_parallel) against one process: 2 and 4 gloo ranks on the CPU.

Each launch of ranks runs a list of jobs in one process group (starting processes is the slow part on
2 cores): trainings under several layouts and checkpointing modes, one batch's gradients, resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import free_port, losses

from conftest import tiny_config
from pretrain.config import ConfigError
from pretrain.trainer import train

# the debug model's shape with heads a 4-way split allows: 8 query heads, 4 kv heads (GQA), sequence 32
TP_MODEL = ["model.n_heads=8", "model.n_kv_heads=4"]
COMMON = [*TP_MODEL, "train.micro_batch_size=2", "train.steps=6"]
MODES = ["none", "selective", "llama"]
LAYOUTS = {"fsdp2xtp2": ["train.tensor_parallel=2"], "tp4": ["train.tensor_parallel=4"]}


def batch_gradients(cfg) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (whole, on every rank) after the micro-batches of the first global batch."""
    from torch.distributed.tensor import DTensor

    from data_pipeline.loader import BatchLoader
    from pretrain.parallel import build_strategy
    from pretrain.trainer import lm_loss, load_data

    strategy = build_strategy(cfg)
    model, _ = strategy.setup(cfg)
    global_batch = cfg.train.global_batch_tokens // cfg.data.seq_len
    loader = BatchLoader(
        load_data(cfg), global_batch, cfg.train.micro_batch_size, strategy.data_rank, strategy.data_world_size
    )
    micro_batches = loader.next_batch()
    for inputs, targets in micro_batches:
        strategy.backward(lm_loss(model, inputs, targets, strategy) / len(micro_batches))
    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        for name, p in model.named_parameters()
    }


def _jobs_worker(rank: int, world_size: int, port: int, tiny_data: dict, jobs: list, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch.distributed as dist

    try:
        for kind, name, overrides in jobs:
            if kind == "train":
                train(tiny_config(tiny_data, out / name, "train.strategy=fsdp", *overrides))
            elif kind == "grads":
                grads = batch_gradients(tiny_config(tiny_data, out / name, "train.strategy=fsdp", *overrides))
                if rank == 0:
                    torch.save(grads, out / f"{name}.pt")
            elif kind == "copy":  # a run folder copied (by rank 0) to resume it under another layout
                if rank == 0:
                    shutil.copytree(out / overrides[0], out / name)
                dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_jobs(tiny_data: dict, out, jobs: list, world_size: int, limit: float = 600) -> None:
    """Run `jobs` ((kind, name, overrides) in order) on `world_size` gloo ranks; fail rather than hang."""
    context = mp.start_processes(
        _jobs_worker,
        args=(world_size, free_port(), tiny_data, jobs, out),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + limit
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {limit} s: {[j[:2] for j in jobs]}")


def test_tensor_parallel_layouts_match_one_process_and_resume_across_layouts(tiny_data, tmp_path):
    # one process: the reference losses (6 steps) and first-batch gradients of every checkpointing mode
    train(tiny_config(tiny_data, tmp_path / "single", *COMMON))
    reference = losses(tmp_path / "single")
    single_grads = {
        m: batch_gradients(tiny_config(tiny_data, tmp_path / "g", *COMMON, f"train.activation_checkpointing={m}"))
        for m in MODES
    }

    # 4 ranks: FSDP 2 x TP 2 and TP 4, each mode; gradients; a run saved at (dp 2, tp 2) resumed at (dp 4, tp 1)
    jobs = []
    for layout, extra in LAYOUTS.items():
        for mode in MODES:
            overrides = [*COMMON, *extra, f"train.activation_checkpointing={mode}"]
            jobs += [("train", f"{layout}-{mode}", overrides), ("grads", f"grads-{layout}-{mode}", overrides)]
    dp2tp2 = [*COMMON, "train.tensor_parallel=2", "train.activation_checkpointing=llama"]
    jobs += [("train", "saved", [*dp2tp2, "train.stop_at=3"])]
    for copy in ("to-dp4", "to-dp1tp2", "to-one"):
        jobs += [("copy", copy, ["saved"])]
    jobs += [("train", "to-dp4", [*COMMON, "train.tensor_parallel=1"])]
    run_jobs(tiny_data, tmp_path, jobs, world_size=4)
    run_jobs(tiny_data, tmp_path, [("train", "to-dp1tp2", [*COMMON, "train.tensor_parallel=2"])], world_size=2)
    train(tiny_config(tiny_data, tmp_path / "to-one", *COMMON))

    for layout in LAYOUTS:
        for mode in MODES:
            run = f"{layout}-{mode}"
            assert losses(tmp_path / run) == pytest.approx(reference, abs=2e-4), run
            grads = torch.load(tmp_path / f"grads-{run}.pt")
            assert set(grads) == set(single_grads[mode])
            for name, grad in single_grads[mode].items():
                assert (grads[name] - grad).norm() <= 1e-5 * grad.norm(), f"{run}: {name}"
    assert (tmp_path / "saved" / "checkpoints" / "latest").read_text() == "step-00000003"
    for run in ("to-dp4", "to-dp1tp2", "to-one"):  # steps 4-6 resumed under another layout
        assert losses(tmp_path / run)[3:] == pytest.approx(reference[3:], abs=2e-4), run
        assert len(losses(tmp_path / run)) == 6
        last = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
        assert sum(v for k, v in last.items() if k.startswith("tokens_seen/")) == last["tokens_seen"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["train.tensor_parallel=3"],
            r"train.tensor_parallel=3 does not divide model.n_heads=8; choose one of \[1, 2, 4\]",
        ),
        (
            ["train.tensor_parallel=8", "model.n_kv_heads=8", "data.seq_len=36", "train.global_batch_tokens=288"],
            r"does not divide data.seq_len=36; choose one of \[1, 2, 4\]",
        ),
        (["train.tensor_parallel=4", "model.n_kv_heads=2"], r"does not divide model.n_kv_heads=2"),
        (
            ["train.strategy=deepspeed", "train.tensor_parallel=2"],
            "needs train.strategy=fsdp, got deepspeed: use train.strategy=fsdp",
        ),
        (["train.strategy=single", "train.tensor_parallel=2"], "needs train.strategy=fsdp, got single"),
        (["train.tensor_parallel=0"], "train.tensor_parallel must be >= 1"),
    ],
)
def test_layouts_that_cannot_split_are_refused_naming_the_fix(tiny_data, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tiny_data, tmp_path, "train.strategy=fsdp", *TP_MODEL, *overrides)


def test_llama1_33b_heads_allow_tensor_parallel_1_2_4():
    from pretrain.config import load_config

    for tp in (1, 2, 4, 8):
        overrides = ["train.strategy=fsdp", f"train.tensor_parallel={tp}"]
        if tp == 8:
            with pytest.raises(ConfigError, match=r"does not divide model.n_heads=52; choose one of \[1, 2, 4\]"):
                load_config("configs/experiments/llama1-33b.yaml", overrides)
        else:
            assert load_config("configs/experiments/llama1-33b.yaml", overrides).train.tensor_parallel == tp


def test_tensor_parallel_that_does_not_divide_a_node_is_refused(tiny_data, tmp_path, monkeypatch):
    from pretrain.parallel.tensor_parallel import check_layout

    cfg = tiny_config(tiny_data, tmp_path, "train.strategy=fsdp", *TP_MODEL, "train.tensor_parallel=4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")  # 12 ranks as 2 nodes of 6 GPUs
    with pytest.raises(ConfigError, match=r"does not divide the 6 GPUs of a node.*choose one of \[1, 2, 3, 6\]"):
        check_layout(cfg, 12)
    with pytest.raises(ConfigError, match="does not divide the 6 ranks of this launch"):
        check_layout(cfg, 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    check_layout(cfg, 16)
