"""Loss-spike detection: a loss above `spike.factor` x the running median (or mean) of the last
`spike.window` losses, or a gradient norm above `spike.grad_norm_factor` x that statistic of the last
gradient norms (which often rise a few steps before the loss does), once past `spike.after_step`
(default: the end of warmup).

What the trainer does on a spike (PaLM, OPT and OLMo's remedy, automated): go back to the last
checkpoint before it and move the data `spike.skip_batches` batches on. The losses kept here are those
of the steps the run kept, so going back drops the later ones too; they travel in checkpoints, so a
resumed run judges its next loss as the uninterrupted run would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

from pretrain.config import SpikeConfig


class SpikeMonitor:
    """The last `window` (step, loss, gradient norm) of the steps kept, and the spike rules."""

    def __init__(self, cfg: SpikeConfig, warmup_steps: int):
        self.cfg = cfg
        self.after = cfg.after_step if cfg.after_step is not None else warmup_steps
        self.losses: deque[tuple[int, float, float]] = deque(maxlen=cfg.window)

    @property
    def enabled(self) -> bool:
        """Whether a spike rule is set (`spike.factor` or `spike.grad_norm_factor` > 0)."""
        return self.cfg.factor > 0 or self.cfg.grad_norm_factor > 0

    def _reference(self, values: list[float]) -> float:
        return statistics.median(values) if self.cfg.stat == "median" else statistics.fmean(values)

    def check(self, step: int, loss: float, grad_norm: float = math.nan) -> Optional[str]:
        """Why the loss or gradient norm of `step` is a spike, or None; a step that is not a spike joins the
        window."""
        if not self.enabled or not math.isfinite(loss):
            return None
        if step > self.after and len(self.losses) == self.cfg.window:
            rules = (
                ("loss", "losses", self.cfg.factor, loss, 1),
                ("grad norm", "grad norms", self.cfg.grad_norm_factor, grad_norm, 2),
            )
            for what, plural, factor, value, column in rules:
                history = [entry[column] for entry in self.losses if math.isfinite(entry[column])]
                if factor > 0 and history and math.isfinite(value):
                    reference = self._reference(history)
                    if value > factor * reference:
                        return (
                            f"{what} {value:.4f} > {factor:g} x {reference:.4f} "
                            f"(the {self.cfg.stat} of the last {len(history)} {plural})"
                        )
        self.losses.append((step, loss, grad_norm))
        return None

    def state_dict(self) -> list[list[float]]:
        """The window, for a checkpoint."""
        return [[s, v, g] for s, v, g in self.losses]

    def load_state_dict(self, state: list) -> None:
        """Restore the window of a checkpoint (one written before gradient norms were kept: without them)."""
        self.losses.clear()
        self.losses.extend((int(e[0]), float(e[1]), float(e[2]) if len(e) > 2 else math.nan) for e in state)
