"""`single`: one CPU or GPU, no wrapper around the model."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.config import ConfigError, ExperimentConfig, Precision
from pretrain.model import build_model
from pretrain.optim import build_optimizer
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.parallel.base import Strategy, init_from_weights, resolve_precision


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return device


class SingleDevice(Strategy):
    """The whole model on one device; bf16 autocast on GPU unless fp32 is asked for."""

    def __init__(self, cfg: ExperimentConfig):
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def setup(self, cfg: ExperimentConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(cfg.model, self.device, cfg.train.seed, init_from_weights(cfg))
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.compile)
        return model, build_optimizer(model, cfg.optim, fused=self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == Precision.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
