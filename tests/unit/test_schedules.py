"""Ramp-up, constant and MD interval schedules, and gradient rescaling."""
import math

import pytest
import torch

from branchify.autograd import scale_grad
from branchify.schedules import Constant, IntervalSchedule, ScheduleError, SigmoidRampUp, as_schedule


@pytest.mark.parametrize("epoch", [0, 1, 20, 40, 79, 80, 81, 299])
def test_sigmoid_ramp_in_epochs(epoch, ref):
    assert SigmoidRampUp(epochs=80)(epoch) == pytest.approx(ref.ramp(epoch, 80), abs=1e-12)


def test_ramp_values_at_landmarks():
    ramp = SigmoidRampUp(epochs=80)
    assert ramp(0) == pytest.approx(math.exp(-5), abs=1e-12)  # ~0.0067, ONE's first epoch
    assert ramp(80) == 1.0 and ramp(500) == 1.0


@pytest.mark.parametrize("total", [30, 60, 300])
def test_fractional_ramp_scales_with_run(total, ref):
    ramp = SigmoidRampUp(fraction=80 / 300)
    length = 80 / 300 * total
    for e in (0, total // 10, total // 4, total // 2, total - 1):
        assert ramp(e, total) == pytest.approx(ref.ramp(e, length), abs=1e-12)


def test_whole_run_ramp_reaches_one_only_at_the_end(ref):
    ramp = SigmoidRampUp(fraction=1.0)
    assert ramp(299, 300) == pytest.approx(ref.ramp(299, 300)) and ramp(299, 300) < 1.0
    assert ramp(300, 300) == 1.0


def test_fractional_ramp_needs_run_length():
    with pytest.raises(ScheduleError, match="set_epoch"):
        SigmoidRampUp(fraction=0.5)(3)


def test_as_schedule_forms():
    assert isinstance(as_schedule(None), Constant) and as_schedule(None)(5) == 1.0
    assert as_schedule(80).epochs == 80
    assert as_schedule(0.25).fraction == 0.25
    with pytest.raises(ScheduleError, match="pass an int"):
        as_schedule(80.0)
    with pytest.raises(ScheduleError):
        as_schedule(True)
    with pytest.raises(ScheduleError, match="exactly one"):
        SigmoidRampUp()


def test_interval_schedule_gradual_weights():
    s = IntervalSchedule(independent=2, distill=4)
    # epochs 0..13 of a 14-epoch run: two full cycles (6 epochs each) then a cut-short cycle
    expected = []
    for cycle in range(3):
        expected += [("independent", cycle, None, 1.0, 0.0)] * 2
        expected += [("distill", cycle, r, 1 - r / 4, 1 + r / 4) for r in range(4)]
    for epoch in range(14):
        p = s(epoch)
        assert (p.phase, p.cycle, p.r) == expected[epoch][:3], epoch
        assert p.alpha == pytest.approx(expected[epoch][3]) and p.beta == pytest.approx(expected[epoch][4])
    # the last cycle is cut short by the budget: epochs 12, 13 are independent, no distillation happens
    assert s(12).phase == "independent" and s(13).phase == "independent"
    # a budget ending mid-distillation keeps the full-cycle weights (nothing is rescaled)
    assert s(15).r == 1 and s(15).alpha == pytest.approx(0.75)


def test_interval_schedule_fixed_ablation_and_fractional_epoch():
    s = IntervalSchedule(independent=10, distill=30, gradual=False)
    assert (s(10).alpha, s(10).beta) == (1.0, 2.0) and (s(39).alpha, s(39).beta) == (1.0, 2.0)
    g = IntervalSchedule(independent=10, distill=30)
    assert g(25.7).r == 15 and g(25.7).beta == pytest.approx(1.5)


def test_interval_schedule_validates():
    with pytest.raises(ScheduleError):
        IntervalSchedule(independent=-1)
    with pytest.raises(ScheduleError):
        IntervalSchedule(distill=0)


def test_scale_grad_identity_forward_scaled_backward():
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, 1 / 3)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((4,), 1 / 3))
