"""One way to build the model under every strategy (`Strategy.build_model`), and what a GPU changes in
it (device, precision, FSDP's mixed-precision policy, fused AdamW), with the device mocked at the
boundary: `torch.cuda.is_available`, `torch.cuda.is_bf16_supported` and `torch.cuda.set_device`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import DEBUG_EXPERIMENT, run_ranks
from pretrain.config import Checkpointing, ConfigError, Precision, load_config
from pretrain.model import build_model
from pretrain.parallel import STRATEGIES, Strategy
from pretrain.parallel.base import launched_device, resolve_precision
from pretrain.parallel.single import SingleDevice, resolve_device

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=128"]
TINY += ["model.multiple_of=16", "data.seq_len=32", "train.global_batch_tokens=128", "train.micro_batch_size=4"]


def config(*overrides: str):
    return load_config(DEBUG_EXPERIMENT, [*TINY, *overrides])


@pytest.fixture
def cuda_present(monkeypatch) -> list:
    """A machine with a GPU, as far as the strategies can tell; returns the devices `set_device` was given."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


def test_no_strategy_has_a_build_order_of_its_own():
    # the order (new modules, checkpointing, sharding, memory, values, loss chunking) is written once
    for name, cls in STRATEGIES.items():
        assert cls.build_model is Strategy.build_model, name


@pytest.mark.parametrize("mode", list(Checkpointing))
def test_single_device_builds_the_plain_models_values_with_the_loss_chunking_set(mode):
    cfg = config(f"train.activation_checkpointing={mode.value}", "train.loss_chunk_tokens=40", "train.seed=5")
    model = SingleDevice(cfg).build_model(cfg)
    reference = build_model(cfg.model, "cpu", seed=5)
    assert model.loss_chunk_tokens == 40  # set by the strategy: the trainer does not reach into the model
    assert torch.equal(model.rope_cos_sin, reference.rope_cos_sin)
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_weight_decay_follows_the_declared_shapes():
    cfg = config("optim.weight_decay=0.1")
    strategy = SingleDevice(cfg)
    model = strategy.build_model(cfg)
    decayed, plain = strategy.build_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("norm.weight") for p in decayed["params"])
    assert all(names[id(p)].endswith("norm.weight") for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(names)


def test_device_auto_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda:1 but no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_single_device_on_a_gpu_is_bf16_autocast_with_fused_adamw(cuda_present):
    cfg = config("train.device=auto")
    strategy = SingleDevice(cfg)
    assert strategy.device == torch.device("cuda") and cuda_present == [torch.device("cuda")]
    assert strategy.precision == Precision.bf16
    autocast = strategy.autocast()
    assert isinstance(autocast, torch.autocast) and autocast.device == "cuda"
    assert autocast.fast_dtype == torch.bfloat16
    model = build_model(cfg.model)  # the optimizer's choice only looks at the strategy's device
    assert strategy.build_optimizer(model, cfg).defaults["fused"] is True
    fp32 = SingleDevice(config("train.device=auto", "train.precision=fp32"))
    assert fp32.precision == Precision.fp32 and not isinstance(fp32.autocast(), torch.autocast)


def test_single_device_on_the_cpu_is_fp32_with_the_default_adamw(cuda_present):
    cfg = config("train.device=cpu")
    strategy = SingleDevice(cfg)
    assert strategy.device == torch.device("cpu") and cuda_present == []
    assert strategy.precision == Precision.fp32 and not isinstance(strategy.autocast(), torch.autocast)
    assert not strategy.build_optimizer(build_model(cfg.model), cfg).defaults["fused"]


def test_deepspeed_offload_takes_deepspeeds_cpu_adam_and_otherwise_fused_adamw_on_a_gpu(monkeypatch):
    import deepspeed.ops.adam

    from pretrain.parallel.deepspeed import DeepSpeed, deepspeed_config

    class CPUAdam(torch.optim.AdamW):  # stands in for DeepSpeedCPUAdam, whose C++ op compiles on first use
        pass

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", CPUAdam)
    offload = config("train.strategy=deepspeed", "train.zero_stage=2", "train.offload_optimizer=true")
    strategy = DeepSpeed.__new__(DeepSpeed)  # the optimizer choice alone: no process group, no engine
    strategy.device = torch.device("cuda")
    strategy.config = deepspeed_config(offload, 1, Precision.bf16)
    model = build_model(offload.model)
    optimizer = strategy.build_optimizer(model, offload)
    assert type(optimizer) is CPUAdam and not optimizer.defaults["fused"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [offload.optim.weight_decay, 0.0]
    strategy.config = deepspeed_config(config("train.strategy=deepspeed", "train.zero_stage=2"), 1, Precision.bf16)
    optimizer = strategy.build_optimizer(model, offload)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True


def test_launched_ranks_take_their_local_gpu(cuda_present, monkeypatch):
    cfg = config("train.strategy=fsdp", "train.device=auto")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="train.strategy=fsdp needs a launcher: torchrun"):
        launched_device(cfg, "torchrun ...")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launched_device(cfg, "torchrun ...") == torch.device("cuda", 3)
    assert cuda_present == [torch.device("cuda", 3)]
    assert launched_device(config("train.strategy=fsdp", "train.device=cpu"), "torchrun ...") == torch.device("cpu")


def test_precision_auto_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    cfg = config()
    assert resolve_precision(cfg, torch.device("cuda", 0)) == Precision.bf16
    assert resolve_precision(cfg, torch.device("cpu")) == Precision.fp32
    assert resolve_precision(config("train.precision=fp32"), torch.device("cuda")) == Precision.fp32


def test_fsdp_policy_on_a_gpu_is_bf16_compute_with_fp32_reduction():
    from pretrain.parallel.fsdp import mixed_precision_policies

    root, block = mixed_precision_policies(resolve_precision(config(), torch.device("cuda")))
    assert root.param_dtype == block.param_dtype == torch.bfloat16
    assert root.reduce_dtype == block.reduce_dtype == torch.float32
    assert root.cast_forward_inputs and not block.cast_forward_inputs  # the fp32 RoPE table reaches the blocks
    root, block = mixed_precision_policies(resolve_precision(config(), torch.device("cpu")))
    assert root.param_dtype is None and block.param_dtype is None


def _fsdp_bf16_worker(rank: int, port: int, overrides: list, out) -> None:
    """One FSDP rank on the CPU in bf16: what its model holds, computes in and reduces in."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import torch.distributed as dist

    from pretrain.parallel.fsdp import FSDP

    cfg = config(*overrides)
    try:
        strategy = FSDP(cfg)
        model, optimizer = strategy.setup(cfg)
        seen = []
        model.layers[0].attention.wq.register_forward_pre_hook(lambda m, a: seen.append([m.weight.dtype, a[0].dtype]))
        tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        reference = build_model(cfg.model, "cpu", seed=cfg.train.seed).state_dict()
        result = {
            "policies": [
                [str(s._mp_policy.param_dtype), str(s._mp_policy.reduce_dtype), s._mp_policy.cast_forward_inputs]
                for s in (model.layers[0]._get_fsdp_state(), model._get_fsdp_state())
            ],
            "compute": [str(d) for d in seen[0]],
            "loss": str(loss.dtype),
            "params": sorted({str(p.dtype) for p in model.parameters()}),
            "grads": sorted({str(p.grad.dtype) for p in model.parameters()}),
            "values_equal": all(torch.equal(p.full_tensor(), reference[n]) for n, p in model.named_parameters()),
            "loss_chunk_tokens": model.loss_chunk_tokens,
            "fused": optimizer.defaults["fused"],
        }
        (out / "fsdp.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_in_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients(tmp_path):
    from test_distributed import free_port

    overrides = ["train.strategy=fsdp", "train.device=cpu", "train.precision=bf16", "train.loss_chunk_tokens=8"]
    run_ranks(_fsdp_bf16_worker, (free_port(), overrides, tmp_path), 1)
    result = json.loads((tmp_path / "fsdp.json").read_text())
    assert result["policies"] == [["torch.bfloat16", "torch.float32", False], ["torch.bfloat16", "torch.float32", True]]
    assert result["compute"] == ["torch.bfloat16", "torch.bfloat16"]  # weights gathered in bf16, bf16 activations
    assert result["loss"] == "torch.float32"
    assert result["params"] == result["grads"] == ["torch.float32"]  # sharded fp32 master weights and gradients
    assert result["values_equal"]  # the single process's initial values
    assert result["loss_chunk_tokens"] == 8 and not result["fused"]
