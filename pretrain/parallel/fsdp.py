"""`fsdp`: PyTorch FSDP2 (`fully_shard`) one transformer block at a time, over all ranks or, with
`train.fsdp_shard_size`, HSDP: sharded within groups of that many ranks (a node) and replicated across.
With `train.tensor_parallel=T`, each layer is first split over groups of T consecutive ranks (tensor +
sequence parallel, `pretrain.parallel.tensor_parallel`) and FSDP2 shards over the data-parallel ranks:
the device mesh is (shard, tp), or (replicate, shard, tp) with `train.fsdp_shard_size`, tensor parallel
innermost so that its ranks share a node.

The model is built on `meta`, checkpointed and sharded from outside (each block, then the root), then
materialised shard by shard: each rank only ever allocates its own slice of every parameter, and
initial values are the ones a single process would draw (`pretrain.model.initial_value`). Checkpoints
go through torch.distributed.checkpoint (one file per rank), which any number of ranks can read.
"""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from pretrain.config import ConfigError, ExperimentConfig, Precision, divisors
from pretrain.model import Transformer
from pretrain.parallel.base import DataParallelStrategy, launched_device, resolve_precision
from pretrain.parallel.tensor_parallel import apply_tensor_parallel, check_layout, forward_context


def mixed_precision_policies(precision: Precision) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(root, block) policies: bf16 parameters in the forward and backward when `precision` is bf16,
    gradients reduced in fp32 always. The blocks get the hidden states already in bf16 (the
    embedding's dtype); their other input, the RoPE table, must stay fp32 as under the other
    strategies, so block inputs are not cast."""
    param_dtype = torch.bfloat16 if precision == Precision.bf16 else None
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    block = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return root, block


class FSDP(DataParallelStrategy):
    """Fully sharded data parallel: parameters, gradients and optimizer states split over ranks."""

    def __init__(self, cfg: ExperimentConfig):
        self.device = launched_device(cfg, "torchrun --nproc_per_node N -m pretrain train ... (launch/torchrun.sh)")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_layout(cfg, self.world_size)
        self.tensor_parallel = tp = cfg.train.tensor_parallel
        data = self.world_size // tp
        shard = cfg.train.fsdp_shard_size or data
        if data % shard:
            raise ConfigError(
                f"train.fsdp_shard_size={shard} does not divide the {data} data-parallel ranks "
                f"({self.world_size} ranks / train.tensor_parallel={tp}); choose one of "
                f"{divisors(data)}"
            )
        # FSDP: shard over every data-parallel rank; HSDP: within groups of `shard` (a node), replicated across
        sizes = {"replicate": data // shard, "shard": shard, "tp": tp}
        names = tuple(name for name, size in sizes.items() if size > 1 or name == "shard")
        self.mesh = init_device_mesh(self.device.type, tuple(sizes[n] for n in names), mesh_dim_names=names)
        self.data_mesh = self.mesh[tuple(n for n in names if n != "tp")] if tp > 1 else self.mesh
        self.reshard_after_forward = cfg.train.reshard_after_forward
        self.precision = resolve_precision(cfg, self.device)

    def parallelize(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """Tensor + sequence parallel plans over the `tp` dimension of the mesh (with `train.tensor_parallel`)."""
        if self.tensor_parallel > 1:
            apply_tensor_parallel(model, self.mesh["tp"])

    def shard(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """`fully_shard` each block, then the root (the embedding, final norm and output), over the
        data-parallel dimensions of the mesh."""
        root, block = mixed_precision_policies(self.precision)
        for layer in model.layers:
            fully_shard(layer, mesh=self.data_mesh, mp_policy=block, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=self.data_mesh, mp_policy=root, reshard_after_forward=self.reshard_after_forward)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm in one all-reduce over every rank, whatever the mesh: each rank adds the
        squares of its local gradient shards, a tensor replicated over k ranks counted 1/k on each."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for grad in grads:
            replicas = math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate())
            squares += grad.to_local().double().pow(2).sum() / replicas
        dist.all_reduce(squares)
        norm = squares.sqrt().float()
        if max_norm > 0 and math.isfinite(coefficient := max_norm / (norm.item() + 1e-6)) and coefficient < 1:
            torch._foreach_mul_([g.to_local() for g in grads], coefficient)
        return norm

    def autocast(self) -> contextlib.AbstractContextManager:
        """The vocabulary-parallel cross-entropy under tensor parallelism (FSDP's policy does mixed precision)."""
        return forward_context(self.tensor_parallel)

    def backward(self, loss: torch.Tensor) -> None:
        with forward_context(self.tensor_parallel):
            loss.backward()

    def write_initial_value(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """This rank's shard of `value` (every rank holds the whole value: nothing is sent)."""
        param.copy_(distribute_tensor(value.to(self.device), param.device_mesh, param.placements, src_data_rank=None))
