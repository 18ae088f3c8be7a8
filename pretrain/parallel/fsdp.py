"""`fsdp`: PyTorch FSDP2 (`fully_shard`) one transformer block at a time, over all ranks or, with
`train.fsdp_shard_size`, HSDP: sharded within groups of that many ranks (a node) and replicated across.

The model is built on `meta`, checkpointed and sharded from outside (each block, then the root), then
materialised shard by shard: each rank only ever allocates its own slice of every parameter, and
initial values are the ones a single process would draw (`Transformer.initial_value`). Checkpoints
go through torch.distributed.checkpoint, one file per rank.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from pretrain.config import ConfigError, ExperimentConfig, Precision
from pretrain.model import Transformer, rope_cos_sin
from pretrain.optim import build_optimizer
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.parallel.base import Strategy


class FSDP(Strategy):
    """Fully sharded data parallel: parameters, gradients and optimizer states split over ranks."""

    def __init__(self, cfg: ExperimentConfig):
        if "RANK" not in os.environ:
            raise ConfigError("train.strategy=fsdp needs a launcher: torchrun --nproc_per_node N -m pretrain train ...")
        use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        shard = cfg.train.fsdp_shard_size or self.world_size
        if self.world_size % shard:
            raise ConfigError(f"train.fsdp_shard_size={shard} does not divide the world size {self.world_size}")
        if shard == self.world_size:  # FSDP: shard over every rank
            self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        else:  # HSDP: shard within groups of `shard` ranks (a node), replicate across groups
            self.mesh = init_device_mesh(
                self.device.type, (self.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
            )
        self.reshard_after_forward = cfg.train.reshard_after_forward
        precision = cfg.train.precision
        if precision == Precision.auto:
            precision = Precision.bf16 if use_cuda else Precision.fp32
        self.precision = precision

    def setup_model(self, cfg: ExperimentConfig) -> nn.Module:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.precision == Precision.bf16 else None, reduce_dtype=torch.float32
        )
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        model.to_empty(device=self.device)
        with torch.no_grad():
            args = cfg.model
            model.rope_cos_sin.copy_(rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta))
            for name, param in model.named_parameters():
                full = model.initial_value(name, cfg.train.seed).to(self.device)
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        return model

    def setup_optimizer(self, model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
        return build_optimizer(model, cfg.optim, fused=self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        dist.barrier()

    def save(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / "dcp"))

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
