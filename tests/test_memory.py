"""The memory planner against the activation bytes measured by bench/activation_memory.py, and its answers."""

import importlib.util
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import ROOT, run_ranks
from pretrain.config import Checkpointing, Precision, load_config
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
            ("train.strategy=fsdp train.tensor_parallel=8", ["train.strategy=fsdp", "train.tensor_parallel=8"]),
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


def _saved_bytes_worker(rank: int, port: int, modes: list, out) -> None:
    """Bytes per token one block under tensor + sequence parallel (2 ranks) keeps for its backward, by mode."""
    import json
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from pretrain.model import Transformer, rope_cos_sin
    from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
    from pretrain.parallel.tensor_parallel import block_plan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    args, seq = load_config("debug").model, 64

    def saved_per_token(mode: str) -> float:
        with torch.device("meta"):
            model = Transformer(args)
        model.layers = torch.nn.ModuleList([model.layers[0]])
        parallelize_module(model.layers[0], mesh, block_plan())
        apply_activation_checkpointing(model, Checkpointing(mode))
        block = model.layers[0].to_empty(device="cpu")
        for p in block.parameters():
            torch.nn.init.normal_(p.to_local(), std=0.02)
        cos_sin = rope_cos_sin(args.head_dim, seq, args.rope_theta)
        skip = {p.to_local().untyped_storage().data_ptr() for p in block.parameters()}
        skip.add(cos_sin.untyped_storage().data_ptr())
        saved = {}

        def pack(t):
            storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
            if storage.data_ptr() not in skip:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(1, seq // 2, args.dim, requires_grad=True)  # this rank's half of the sequence
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, cos_sin)
        y.sum().backward()
        return sum(saved.values()) / seq

    result = {mode: saved_per_token(mode) for mode in modes}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_activation_formula_under_tensor_parallel_2_matches_the_measured_saved_bytes(tmp_path):
    import json

    from test_distributed import free_port

    modes = ["none", "full", "llama"]  # selective keeps its outputs inside torch.utils.checkpoint: not seen here
    run_ranks(_saved_bytes_worker, (free_port(), modes, tmp_path), 2)
    args = load_config("debug").model
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for mode in modes:
            planned = 4 * activation_elements_per_token(args, Checkpointing(mode), tensor_parallel=2)
            assert planned == pytest.approx(measured[mode], rel=0.01), mode
            assert planned < 0.56 * 4 * activation_elements_per_token(args, Checkpointing(mode)), mode


def test_tensor_parallel_divides_each_gpus_share_and_fewest_offers_it():
    def plan(*overrides, gpus=64):
        return plan_memory(load_config("configs/experiments/llama1-65b.yaml", list(overrides)), gpus)

    llama = "train.activation_checkpointing=llama"
    alone, split = plan("train.strategy=fsdp", llama), plan("train.strategy=fsdp", "train.tensor_parallel=8", llama)
    assert split.parameters == pytest.approx(alone.parameters)  # 64 GPUs share the weights either way
    assert split.activations == pytest.approx(alone.activations / 8)  # each GPU keeps 1/8 of the activations
    hsdp = plan("train.strategy=fsdp", "train.tensor_parallel=8", "train.fsdp_shard_size=2")
    assert hsdp.parameters == pytest.approx(alone.parameters * 64 / 16)  # one copy on 2 x 8 GPUs
    thirty_three = load_config("configs/experiments/llama1-33b.yaml")
    from pretrain.memory import tensor_parallel_options

    assert tensor_parallel_options(thirty_three) == [{"strategy": "fsdp", "tensor_parallel": 4}]  # its 52 heads


@pytest.mark.parametrize("name, gpu_gb", [("llama1-7b-lora", 24), ("llama1-65b-qlora", 48)])
def test_adaptation_presets_fit_the_gpu_they_name_and_count_the_base_in_its_storage(name, gpu_gb):
    from pretrain.adapters import adapter_parameters
    from pretrain.memory import fits, plan_memory
    from pretrain.model import count_params
    from pretrain.quantize import nf4_bytes_per_parameter

    cfg = load_config(name)
    total, _ = count_params(cfg.model)
    plan = plan_memory(cfg, 1)
    assert fits(plan, gpu_gb)
    trained = adapter_parameters(cfg)
    assert trained < 0.01 * total and plan.gradients == 4 * trained and plan.optimizer == 8 * trained
    base = plan.parameters - 4 * trained  # bf16 (2 B), or NF4's 0.516 B for the blocks' matrices
    if cfg.peft.quantize == "nf4":
        embeddings = 2 * cfg.model.vocab_size * cfg.model.dim
        assert nf4_bytes_per_parameter() * (total - embeddings) < base < 0.53 * total + 2 * embeddings
    else:
        assert base == 2 * total
    fp32 = replace(cfg, train=replace(cfg.train, precision=Precision.fp32), peft=replace(cfg.peft, quantize="none"))
    assert not fits(plan_memory(fp32, 1), gpu_gb)  # an fp32 base would not fit: the storage is what makes it


@pytest.mark.parametrize("strategy", [{"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}])
def test_a_sharded_adapter_run_keeps_gradients_and_adamw_for_the_adapter_only(strategy):
    from pretrain.adapters import adapter_parameters
    from pretrain.memory import plan_memory
    from pretrain.model import count_params

    cfg = load_config("llama1-7b-lora")
    cfg = replace(cfg, train=replace(cfg.train, **strategy))
    full = plan_memory(replace(cfg, peft=replace(cfg.peft, method="none")), 8)
    lora = plan_memory(cfg, 8)
    trained = adapter_parameters(cfg)
    assert lora.optimizer == pytest.approx(full.optimizer * trained / count_params(cfg.model)[0], rel=1e-9)
    assert lora.gradients < full.gradients / 100 and lora.parameters >= full.parameters


def test_zero_offload_preset_fits_one_80gb_gpu_with_the_optimizer_and_fp32_gradients_on_the_cpu():
    from pretrain.memory import fits, plan_memory
    from pretrain.model import count_params

    cfg = load_config("llama1-7b-zero-offload")
    total, _ = count_params(cfg.model)
    plan = plan_memory(cfg, 1)
    assert fits(plan, 80) and plan.optimizer == 0
    assert plan.cpu_offloaded == 18 * total  # master + moments 12 B, fp32 gradient partition 4 B, bf16 copy 2 B
    on_gpu = replace(cfg, train=replace(cfg.train, offload_optimizer=False))
    assert not fits(plan_memory(on_gpu, 1), 80)  # the 12 B of AdamW on the GPU would not fit
