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

    def store_base(self, model: torch.nn.Module, cfg: ExperimentConfig) -> None:
        """With an adapter under bf16, the frozen base's matrices stored in bf16 (nothing trains them: no fp32
        master copy is needed, and autocast makes no bf16 copy of them), half the memory of the base; with
        `peft.quantize=nf4`, the blocks' matrices in 4-bit NF4 (`pretrain.quantize`, from the bf16 values under
        bf16 as QLoRA), about an eighth."""
        if cfg.peft.method != "none" and self.precision == Precision.bf16:
            with torch.no_grad():
                for param in model.parameters():
                    if not param.requires_grad and param.ndim >= 2:
                        param.data = param.data.to(torch.bfloat16)
        if cfg.peft.quantize == "nf4":
            from pretrain.quantize import quantize_nf4

            try:
                quantize_nf4(model)
            except ValueError as e:
                raise ConfigError(f"peft.quantize=nf4: {e}") from None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == Precision.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
