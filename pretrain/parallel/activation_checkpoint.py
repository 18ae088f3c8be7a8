"""Activation checkpointing applied to the model from outside, keeping parameter names unchanged."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import Checkpointing


def apply_activation_checkpointing(model: nn.Module, mode: Checkpointing) -> None:
    """`full`: each transformer block keeps only its input and recomputes itself in the backward."""
    if mode == Checkpointing.none:
        return
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
