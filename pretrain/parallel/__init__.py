"""Parallelism strategies behind one interface (`Strategy`), chosen by `train.strategy`."""

from pretrain.config import ExperimentConfig
from pretrain.parallel.base import Strategy
from pretrain.parallel.deepspeed import DeepSpeed
from pretrain.parallel.fsdp import FSDP
from pretrain.parallel.single import SingleDevice

STRATEGIES = {"single": SingleDevice, "fsdp": FSDP, "deepspeed": DeepSpeed}


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by `train.strategy`."""
    return STRATEGIES[cfg.train.strategy](cfg)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
