"""Loss-spike detection: a loss above `spike.factor` x the running median (or mean) of the last
`spike.window` losses, once past `spike.after_step` (default: the end of warmup).

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
    """The last `window` losses (with their steps) and the spike rule."""

    def __init__(self, cfg: SpikeConfig, warmup_steps: int):
        self.cfg = cfg
        self.after = cfg.after_step if cfg.after_step is not None else warmup_steps
        self.losses: deque[tuple[int, float]] = deque(maxlen=cfg.window)

    @property
    def enabled(self) -> bool:
        """Whether a spike rule is set (`spike.factor` > 0)."""
        return self.cfg.factor > 0

    def check(self, step: int, loss: float) -> Optional[str]:
        """Why the loss of `step` is a spike, or None; a loss that is not a spike joins the window."""
        if not self.enabled or not math.isfinite(loss):
            return None
        if step > self.after and len(self.losses) == self.cfg.window:
            values = [v for _, v in self.losses]
            reference = statistics.median(values) if self.cfg.stat == "median" else statistics.fmean(values)
            if loss > self.cfg.factor * reference:
                return (
                    f"loss {loss:.4f} > {self.cfg.factor:g} x {reference:.4f} "
                    f"(the {self.cfg.stat} of the last {self.cfg.window} losses)"
                )
        self.losses.append((step, loss))
        return None

    def state_dict(self) -> list[list[float]]:
        """The window, for a checkpoint."""
        return [[s, v] for s, v in self.losses]

    def load_state_dict(self, state: list) -> None:
        """Restore the window of a checkpoint."""
        self.losses.clear()
        self.losses.extend((int(s), float(v)) for s, v in state)
