"""Activation checkpointing applied to the model from outside, keeping parameter names unchanged.

`full` keeps only each block's input and recomputes the whole block in the backward pass. `selective`
keeps what is expensive to recompute, the outputs of matrix multiplications and of attention, and
recomputes the cheap memory-bound ops around them (RMSNorm, RoPE, SiLU and the SwiGLU product, casts).
`llama` does what `selective` does with a backward written by hand, without autograd's bookkeeping.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pretrain.config import Checkpointing

aten = torch.ops.aten
SAVED_OPS = {  # outputs kept by `selective`
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: Checkpointing, compile: bool = False) -> None:
    """Wrap each transformer block's forward in `torch.utils.checkpoint` for `full` and `selective`;
    `llama` routes it through the hand-written backward (`pretrain.llama_backward`). With `compile`,
    each block is then compiled with `torch.compile` (in place: parameter names do not change)."""
    if mode == Checkpointing.llama:
        from pretrain.llama_backward import apply_llama_backward

        apply_llama_backward(model)
    elif mode != Checkpointing.none:
        options = {"use_reentrant": False}
        if mode == Checkpointing.selective:
            options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        for block in model.layers:
            block.forward = functools.partial(checkpoint, block.forward, **options)
    if compile:
        for block in model.layers:
            block.compile()
