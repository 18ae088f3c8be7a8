"""`single`: one CPU or GPU, no wrapper around the model."""

from __future__ import annotations

import contextlib

import torch

from pretrain.config import ConfigError, ExperimentConfig, Precision
from pretrain.parallel.base import Strategy, resolve_precision


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return device


class SingleDevice(Strategy):
    """The whole model on one device (the `Strategy` defaults); bf16 autocast on GPU unless fp32 is asked for."""

    def __init__(self, cfg: ExperimentConfig):
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == Precision.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
