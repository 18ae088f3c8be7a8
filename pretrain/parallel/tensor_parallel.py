"""Tensor + sequence parallelism (Megatron-LM's, Korthikanti et al. 2022), applied to the plain model from outside.

`train.tensor_parallel=T` splits every transformer block over T ranks (a node's GPUs, on NVLink) with
DTensor plans, before activation checkpointing and FSDP2, as torchtitan's `parallelize_llama` does:

- wq wk wv w1 w3 column-parallel (each rank its heads, its slice of the feed-forward), wo and w2
  row-parallel with their outputs reduce-scattered along the sequence;
- the RMSNorms and the residual stream sequence-parallel: between the row-parallel and the next
  column-parallel matmul each rank holds 1/T of the sequence (the sequence-sharded normed input is
  all-gathered once before wq/wk/wv and once before w1/w3);
- the embedding row-parallel (vocabulary rows), its output reduce-scattered to sequence slices;
- the output projection column-parallel over the vocabulary, its logits left sharded and the
  cross-entropy computed on the shards (`loss_parallel`): the full logits are never gathered for the loss.

`none`, `selective` and `full` checkpointing run the block's own modules through these plans; `llama`
routes the block through `pretrain.llama_backward.LlamaBlockFunction`, which takes the local shards
and issues the same collectives itself (see there). The model's outputs leave as plain tensors: the
loss (the same on every rank of the group) and, without targets, the whole logits.
"""

from __future__ import annotations

import contextlib
import os

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from pretrain.config import ConfigError, ExperimentConfig, divisors
from pretrain.model import Transformer


class GatherSequence(ParallelStyle):
    """The module's first input, this rank's slice of the sequence (batch, seq / T, dim), all-gathered into
    the whole sequence before the module runs; its other inputs (RoPE table, mask) pass as they are.

    The gathered input stays a (replicated) DTensor into the column-parallel matmuls, so that their input
    gradients, partial sums on each rank, are added up as such and reduce-scattered once in the backward
    (a plain tensor there would make DTensor all-reduce each matmul's input gradient on its own)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def gather(_, inputs):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (Shard(1),), run_check=False)
            return (x.redistribute(placements=(Replicate(),)), *inputs[1:])

        module.register_forward_pre_hook(gather)
        return module


def block_plan() -> dict[str, ParallelStyle]:
    """Where each part of a transformer block goes (Megatron-LM's split, sequence-parallel norms)."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": GatherSequence(),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": GatherSequence(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def plain_outputs(module: nn.Module, inputs, output):
    """The model's output as a plain tensor: the loss (replicated over the group) as it is, logits gathered."""
    if isinstance(output, DTensor):  # a copy of the loss, not a view: FSDP's hooks refuse views
        return output.to_local().clone() if all(p.is_replicate() for p in output.placements) else output.full_tensor()
    return output


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Shard `model` (on `meta`, before checkpointing and FSDP) over the tensor-parallel `mesh`."""
    parallelize_module(
        model,
        mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # the final norm's output is sequence-sharded: gathered (once) before the vocabulary-parallel matmul
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        },
    )
    for block in model.layers:
        parallelize_module(block, mesh, block_plan())
    model.register_forward_hook(plain_outputs)


def forward_context(tensor_parallel: int) -> contextlib.AbstractContextManager:
    """Around a forward (and its backward) that computes a loss: the vocabulary-parallel cross-entropy."""
    return loss_parallel() if tensor_parallel > 1 else contextlib.nullcontext()


def check_layout(cfg: ExperimentConfig, world_size: int) -> None:
    """Refuse a tensor-parallel degree that does not divide the world, or a node's GPUs, in one line."""
    tp = cfg.train.tensor_parallel
    if world_size % tp:
        raise ConfigError(
            f"train.tensor_parallel={tp} does not divide the {world_size} ranks of this launch; launch a multiple of "
            f"{tp} ranks, or choose one of {divisors(world_size)}"
        )
    node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if node % tp:
        choices = divisors(node)
        raise ConfigError(
            f"train.tensor_parallel={tp} does not divide the {node} GPUs of a node (LOCAL_WORLD_SIZE): tensor "
            f"parallelism stays inside a node, on NVLink; choose one of {choices}"
        )
