"""Parallelism strategies behind one interface (`Strategy`), chosen by `train.strategy`."""

import os

from pretrain.config import ExperimentConfig
from pretrain.parallel.base import Strategy
from pretrain.parallel.deepspeed import DeepSpeed
from pretrain.parallel.fsdp import FSDP
from pretrain.parallel.single import SingleDevice
from pretrain.runtime import configure_threads, quiet_other_ranks

STRATEGIES = {"single": SingleDevice, "fsdp": FSDP, "deepspeed": DeepSpeed}


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by `train.strategy`, after the process-wide settings (threads, library logging)."""
    configure_threads()
    quiet_other_ranks(int(os.environ.get("RANK", "0")))
    return STRATEGIES[cfg.train.strategy](cfg)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
