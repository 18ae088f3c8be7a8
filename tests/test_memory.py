"""The memory planner against the activation bytes measured by bench/activation_memory.py, and its answers."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT
from pretrain.config import Checkpointing, load_config
from pretrain.memory import activation_elements_per_token, fewest_gpus, plan_memory


def load_bench():
    spec = importlib.util.spec_from_file_location("activation_memory", ROOT / "bench" / "activation_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n_kv_heads", [8, 4], ids=["mha", "gqa"])
def test_activation_formula_matches_the_measured_saved_bytes(n_kv_heads):
    import torch

    bench = load_bench()
    cfg = load_config("debug", [f"model.n_kv_heads={n_kv_heads}"])
    for mode in ("none", "full", "selective", "llama"):
        measured = bench.measure(cfg, mode, 1, 64, torch.device("cpu"), None)["saved_bytes_per_token"]
        planned = 4 * activation_elements_per_token(cfg.model, Checkpointing(mode))  # fp32 here
        assert planned == pytest.approx(measured, rel=0.01), mode


def test_plans_order_as_the_strategies_shard():
    def total(*overrides, gpus=8):
        return plan_memory(load_config("configs/experiments/llama1-7b.yaml", list(overrides)), gpus).total

    zero = [total("train.strategy=deepspeed", f"train.zero_stage={s}") for s in range(4)]
    assert zero[0] > zero[1] > zero[2] > zero[3]
    assert total("train.strategy=fsdp", gpus=16) < total("train.strategy=fsdp", gpus=8)
    offloaded = plan_memory(
        load_config("configs/experiments/llama1-7b.yaml", ["train.strategy=deepspeed", "train.offload_optimizer=true"]),
        8,
    )
    assert offloaded.optimizer == 0 and offloaded.cpu_offloaded > 0


def test_llama_checkpointing_lets_65b_fit_on_fewer_a100s_than_none():
    def fewest(mode):
        overrides = ["train.strategy=deepspeed", "train.zero_stage=3", f"train.activation_checkpointing={mode}"]
        return fewest_gpus(load_config("configs/experiments/llama1-65b.yaml", overrides), 80)

    assert fewest("llama") < fewest("none")
    assert fewest("full") <= fewest("llama")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "memory",
            "configs/experiments/llama1-65b.yaml",
            "train.strategy=deepspeed",
            "train.activation_checkpointing=llama",
            "--fewest",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        result.returncode == 0 and f"(multiples of 8): {fewest('llama')}" in result.stdout and "fits" in result.stdout
    )


def test_fewest_says_why_a_single_gpu_strategy_fits_nowhere_and_finds_the_sharded_one():
    cfg = load_config("configs/experiments/llama1-65b.yaml")
    assert cfg.train.strategy == "single" and fewest_gpus(cfg, 80) is None
    counts = {
        strategy: fewest_gpus(load_config("configs/experiments/llama1-65b.yaml", overrides), 80)
        for strategy, overrides in (
            ("train.strategy=fsdp", ["train.strategy=fsdp"]),
            ("train.strategy=deepspeed train.zero_stage=3", ["train.strategy=deepspeed", "train.zero_stage=3"]),
        )
    }
    best = min(counts, key=lambda strategy: counts[strategy])
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "memory", "configs/experiments/llama1-65b.yaml", "--fewest"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "does not fit on any number of 80 GB GPUs under single" in out and "shards nothing" in out
    for strategy, n in counts.items():
        assert f"with {strategy}: fits on {n} GPUs" in out
    assert f"add {best} to the command line" in out and f"(multiples of 8): {counts[best]}" in out
    plan = out.split(f"(multiples of 8): {counts[best]}")[1]
    assert f"{counts[best]} GPU(s), {best.split('=')[1].split()[0]}" in plan and "fits" in plan
