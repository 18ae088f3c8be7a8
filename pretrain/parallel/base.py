"""The one interface every parallelism strategy implements; the trainer only talks to this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from pretrain.config import ExperimentConfig


class Strategy(ABC):
    """How the model is placed, run and saved: single device today, FSDP2 and DeepSpeed beside it."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and shared files."""
        return self.rank == 0

    @abstractmethod
    def setup_model(self, cfg: ExperimentConfig) -> nn.Module:
        """Build the model on `meta`, apply checkpointing/sharding, materialise and initialise it."""

    @abstractmethod
    def setup_optimizer(self, model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
        """The optimizer over the (possibly sharded) parameters."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (none by default)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss`."""
        loss.backward()

    @abstractmethod
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm across all ranks, clipped to `max_norm` when it is > 0."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply and clear the accumulated gradients."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a metric over ranks (identity on one process)."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (the same answer everywhere)."""
        return flag

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    @abstractmethod
    def save(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write model and optimizer state into `folder` in this strategy's form."""

    @abstractmethod
    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Read model and optimizer state written by `save`."""

    def peak_memory_gb(self) -> float:
        """Peak memory of this process: allocated on the GPU, resident set on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
