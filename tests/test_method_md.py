"""MD: accuracy-weighted probability mixture teacher under the interval schedule."""
import pytest
import torch

from branchify.aggregators import AccuracyWeighted, AggregatorError
from branchify.loss import OnlineKD
from branchify.schedules import IntervalSchedule


def test_md_loss_matches_formula_over_a_cycle(fake_model, output, ref):
    acc = [0.72, 0.65, 0.58]
    out, y = output(k=3), torch.randint(0, 5, (6,))
    okd = OnlineKD(fake_model(num_leaves=3), AccuracyWeighted(acc), temperature=3.0,
                   interval=IntervalSchedule(independent=2, distill=4))
    a = torch.tensor(acc) / sum(acc)
    s_e = sum(a[i] * torch.softmax(out.logits[i] / 3.0, -1) for i in range(3))
    ce = sum(ref.ce(z, y) for z in out.logits)
    kd = sum(ref.kl_probs(s_e, z, 3.0) for z in out.logits)
    for epoch, alpha, beta in [(0, 1.0, 0.0), (1, 1.0, 0.0), (2, 1.0, 1.0), (3, 0.75, 1.25), (5, 0.25, 1.75),
                               (6, 1.0, 0.0), (9, 0.75, 1.25), (11, 0.25, 1.75)]:
        okd.set_epoch(epoch, 12)
        loss = okd(out, y)
        assert torch.allclose(loss.total, alpha * ce + beta * kd, atol=1e-6), epoch
        if beta:
            assert loss.parts["alpha"].item() == pytest.approx(alpha)
        else:
            assert not any(k.startswith("kd/") for k in loss.parts)


def test_fixed_weight_ablation(fake_model, output, ref):
    out, y = output(k=2), torch.randint(0, 5, (6,))
    okd = OnlineKD(fake_model(num_leaves=2), AccuracyWeighted([1.0, 1.0]), temperature=3.0,
                   interval=IntervalSchedule(independent=1, distill=3, gradual=False))
    okd.set_epoch(3, 8)
    p = (torch.softmax(out.logits[0] / 3, -1) + torch.softmax(out.logits[1] / 3, -1)) / 2
    expected = sum(ref.ce(z, y) for z in out.logits) + 2.0 * sum(ref.kl_probs(p, z, 3.0) for z in out.logits)
    assert torch.allclose(okd(out, y).total, expected, atol=1e-6)


def test_accuracies_validated_and_updatable(fake_model, output):
    agg = AccuracyWeighted([1.0, 3.0])
    assert torch.allclose(agg.weights, torch.tensor([0.25, 0.75]))
    agg.set_accuracies([2.0, 2.0])
    assert torch.allclose(agg.weights, torch.tensor([0.5, 0.5]))
    with pytest.raises(AggregatorError, match="2 leaves"):
        agg.set_accuracies([1.0, 1.0, 1.0])
    with pytest.raises(AggregatorError, match=">= 0"):
        AccuracyWeighted([-1.0, 1.0])
    with pytest.raises(AggregatorError, match="3 leaves"):
        OnlineKD(fake_model(num_leaves=2), AccuracyWeighted([1.0, 1.0, 1.0]))


def test_teacher_is_constant_by_default(fake_model, output):
    out = output(k=2)
    okd = OnlineKD(fake_model(num_leaves=2), AccuracyWeighted([0.5, 0.9]))
    okd.term_loss(okd.targets(out).kd[0]).backward()
    assert out.logits[1].grad is None


def test_interval_needs_epoch(fake_model, output):
    okd = OnlineKD(fake_model(num_leaves=2), AccuracyWeighted([0.5, 0.9]), interval=IntervalSchedule())
    with pytest.raises(RuntimeError, match="set_epoch"):
        okd(output(k=2), torch.zeros(6, dtype=torch.long))
