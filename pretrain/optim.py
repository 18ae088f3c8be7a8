"""AdamW with decoupled weight decay on matrices, and LLaMA's warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    shapes: dict[str, tuple[int, ...]],
    fused: bool = False,
    optimizer_class: type = torch.optim.AdamW,
) -> torch.optim.Optimizer:
    """AdamW; weight decay on parameters with 2+ dimensions (matrices, embeddings), none on norms.

    `shapes` are the parameters' shapes by name as the model declares them (`pretrain.model.param_shapes`),
    which a sharded or partitioned parameter no longer shows. `optimizer_class` is another AdamW
    implementation with the same arguments (DeepSpeedCPUAdam).
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in params if len(shapes[name]) >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for name, p in params if len(shapes[name]) < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": fused or None} if optimizer_class is torch.optim.AdamW else {}
    return optimizer_class(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based).

    Linear warmup from 1/warmup_steps to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`
    at `total_steps` (LLaMA-1: 2000 warmup steps, decay to 10% of the peak).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor`; its state_dict is the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )


def apply_optim_config(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig
) -> None:
    """Put `cfg` into an optimizer and scheduler restored from a checkpoint made with other values: AdamW's
    betas, eps and weight decay, and the peak rate; the current rate is recomputed on the schedule the
    scheduler was built with (`build_scheduler`), so the next step already uses it."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, initial_lr=cfg.lr)
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # the matrices (build_optimizer's first group)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.last_epoch -= 1
    scheduler.step()  # the rate of the step it is at, on the new schedule
