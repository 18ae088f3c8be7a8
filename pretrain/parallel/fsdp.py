"""`fsdp`: PyTorch FSDP2 (`fully_shard`) one transformer block at a time, over all ranks or, with
`train.fsdp_shard_size`, HSDP: sharded within groups of that many ranks (a node) and replicated across.

The model is built on `meta`, checkpointed and sharded from outside (each block, then the root), then
materialised shard by shard: each rank only ever allocates its own slice of every parameter, and
initial values are the ones a single process would draw (`Transformer.initial_value`). Checkpoints
go through torch.distributed.checkpoint (one file per rank), which any number of ranks can read.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from pretrain.config import ConfigError, ExperimentConfig, Precision
from pretrain.model import Transformer, rope_cos_sin
from pretrain.optim import build_optimizer
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.parallel.base import DataParallelStrategy, init_from_weights, launched_device, resolve_precision


class FSDP(DataParallelStrategy):
    """Fully sharded data parallel: parameters, gradients and optimizer states split over ranks."""

    def __init__(self, cfg: ExperimentConfig):
        self.device = launched_device(cfg, "torchrun --nproc_per_node N -m pretrain train ... (launch/torchrun.sh)")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
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
        self.precision = resolve_precision(cfg, self.device)

    def setup(self, cfg: ExperimentConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.build_model(cfg)
        return model, build_optimizer(model, cfg.optim, fused=self.device.type == "cuda")

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        """On `meta`, checkpointed and sharded, then each rank materialises and initialises its shards."""
        with torch.device("meta"):
            model = Transformer(cfg.model)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.compile)
        param_dtype = torch.bfloat16 if self.precision == Precision.bf16 else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # blocks get the hidden states already in bf16 (the embedding's dtype); their other input, the
        # RoPE table, must stay fp32 as under the other strategies: no casting of block inputs
        block_policy = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=block_policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        model.to_empty(device=self.device)
        values = init_from_weights(cfg) or functools.partial(model.initial_value, seed=cfg.train.seed)
        with torch.no_grad():
            args = cfg.model
            model.rope_cos_sin.copy_(rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta))
            for name, param in model.named_parameters():
                full = values(name).to(self.device)
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        return model
