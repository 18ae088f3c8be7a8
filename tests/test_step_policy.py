"""The skip / rollback / stop policy after each optimizer step, on its own (pretrain/step_policy.py)."""

import math

import pytest
import torch

from pretrain.config import SpikeConfig
from pretrain.errors import NonFiniteLoss
from pretrain.spikes import SpikeMonitor
from pretrain.step_policy import TroublePolicy


def policy(on_nan: str = "stop", cap: int = 5, factor: float = 0.0) -> TroublePolicy:
    return TroublePolicy(on_nan, cap, SpikeMonitor(SpikeConfig(factor=factor, window=2, after_step=0), 0))


def judge(p: TroublePolicy, step: int, loss: float, applied: bool = True, grad_norm: float = 1.0):
    return p.judge(step, torch.tensor(loss), torch.tensor(grad_norm), applied)


def test_a_non_finite_step_stops_or_is_skipped_up_to_the_cap():
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss nan, grad norm nan; stopped \(train.on_nan=skip"):
        judge(policy("stop"), 3, math.nan, applied=False, grad_norm=math.nan)
    p = policy("skip", cap=2)
    assert [judge(p, s, math.nan, applied=False).action for s in (1, 2)] == ["skip", "skip"]
    assert judge(p, 3, 1.0).action == "continue"  # an applied step ends the run of skips
    assert [judge(p, s, math.nan, applied=False).action for s in (4, 5)] == ["skip", "skip"]
    with pytest.raises(NonFiniteLoss, match="step 6: .*3 skipped updates in a row"):
        judge(p, 6, math.nan, applied=False)


def test_a_spike_rolls_back_and_a_failed_retry_goes_one_checkpoint_further():
    p = policy(factor=3, cap=10)
    assert [judge(p, s, 1.0).action for s in (1, 2, 3)] == ["continue"] * 3
    first = judge(p, 7, 10.0)  # a spike at step 7: back before 7
    assert (first.action, first.before) == ("rollback", 7) and first.why.startswith("loss spike, loss 10.0000 > 3")
    p.rolled_back(6)
    assert judge(p, 7, 10.0).before == 6  # the retry from 6 spiked again before getting past 7: before 6
    p.rolled_back(4)
    assert judge(p, 5, 1.0).action == "continue"
    assert judge(p, 7, 10.0).before == 4  # still not past step 7: before 4
    p.rolled_back(2)
    for s in range(3, 9):  # past step 7: the run of rollbacks ends
        judge(p, s, 1.0)
    assert judge(p, 12, 10.0).before == 12


def test_rollbacks_in_a_row_stop_at_the_cap_and_a_non_finite_step_may_roll_back():
    p = policy("rollback", cap=2)
    decision = judge(p, 4, math.nan, applied=False, grad_norm=math.nan)
    assert (decision.action, decision.before) == ("rollback", 4) and decision.why.startswith("non-finite loss nan")
    p.rolled_back(2)
    judge(p, 4, math.nan, applied=False)
    p.rolled_back(0)
    with pytest.raises(NonFiniteLoss, match="3 rollbacks in a row without getting past step 4"):
        judge(p, 4, math.nan, applied=False)


def test_a_gradient_norm_spike_is_named_as_one():
    p = TroublePolicy("stop", 5, SpikeMonitor(SpikeConfig(grad_norm_factor=4, window=2, after_step=0), 0))
    for s in (1, 2):
        judge(p, s, 2.0, grad_norm=1.0)
    decision = judge(p, 3, 2.0, grad_norm=9.0)
    assert decision.action == "rollback" and decision.why.startswith("gradient-norm spike, grad norm 9.0000 > 4")
