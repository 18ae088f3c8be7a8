"""What a troubled step leads to: continue, skip its update, go back to a checkpoint, or stop.

After every optimizer step the trainer asks `TroublePolicy.judge`. A step whose loss or gradient norm is not
finite had its update dropped by the strategy (`applied` false): with `train.on_nan=stop` the run stops, with
`skip` the step is counted as skipped, with `rollback` it is treated as a spike. A finite step is checked by
the spike rules (`pretrain.spikes.SpikeMonitor`); a spike sends the run back to the last checkpoint before
it. A retry that runs into trouble again before getting past the step of the last rollback goes one
checkpoint further back than the last retry started from. More than `train.max_consecutive_skips` skips in a
row, or rollbacks in a row without getting past the step of the last one, stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pretrain.errors import NonFiniteLoss
from pretrain.spikes import SpikeMonitor


@dataclass
class Decision:
    """`continue`; `skip` (the update was dropped: count it); or `rollback` to the last checkpoint before step
    `before`. `why` says what was wrong."""

    action: str = "continue"
    why: Optional[str] = None
    before: int = 0


class TroublePolicy:
    """The skip / rollback / stop policy of `train.on_nan`, the spike rules and `train.max_consecutive_skips`,
    with the counts it keeps between steps (in this launch)."""

    def __init__(self, on_nan: str, max_in_a_row: int, monitor: SpikeMonitor):
        self.on_nan, self.max_in_a_row, self.monitor = on_nan, max_in_a_row, monitor
        self.skips_in_a_row = 0  # updates skipped since the last applied one
        self.rollbacks_in_a_row, self.rollback_step = 0, 0  # rollbacks since the run last got past one's step
        self.rolled_back_to = 0  # the step of the checkpoint the last rollback went back to

    def judge(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, applied: bool) -> Decision:
        """The decision after optimizer step `step` (its global loss and gradient norm, and whether its update
        was applied); raises NonFiniteLoss when the run must stop. Reads the loss only when it must (a device
        sync): a non-finite step, or a spike rule to check."""
        trouble = None
        if not applied:
            trouble = f"loss {loss.item()}, grad norm {grad_norm.item()}"
            if self.on_nan == "stop":
                raise NonFiniteLoss(f"step {step}: {trouble}; stopped (train.on_nan=skip skips such steps)")
        elif self.monitor.enabled:
            trouble = self.monitor.check(step, loss.item(), grad_norm.item())
        if trouble is None:
            self.skips_in_a_row = 0
            if step >= self.rollback_step:
                self.rollbacks_in_a_row = 0
            return Decision()
        rollback = applied or self.on_nan == "rollback"  # a spike, or a NaN with on_nan=rollback
        if rollback:
            self.rollbacks_in_a_row, self.rollback_step = self.rollbacks_in_a_row + 1, max(self.rollback_step, step)
            count, what = self.rollbacks_in_a_row, f"rollbacks in a row without getting past step {self.rollback_step}"
        else:
            self.skips_in_a_row += 1
            count, what = self.skips_in_a_row, "skipped updates in a row"
        if self.max_in_a_row and count > self.max_in_a_row:
            raise NonFiniteLoss(
                f"step {step}: {trouble}; {count} {what} (train.max_consecutive_skips={self.max_in_a_row}): "
                f"stopped. Look at the data and the learning rate around step {step}, then resume (README: loss spikes)"
            )
        if not rollback:
            return Decision("skip", trouble)
        # a retry that failed again goes one checkpoint further back than the last
        before = step if self.rollbacks_in_a_row == 1 else min(step, self.rolled_back_to)
        kind = "loss" if trouble.startswith("loss") else "gradient-norm"
        return Decision("rollback", f"{kind} spike, {trouble}" if applied else f"non-finite {trouble}", before)

    def rolled_back(self, to_step: int) -> None:
        """The run went back to the checkpoint of step `to_step`."""
        self.rolled_back_to = to_step
