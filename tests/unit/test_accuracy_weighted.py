"""AccuracyWeighted: a fixed accuracy-weighted mixture of the leaves' probabilities as the teacher.

MD's protocol (interval distillation against soft labels over the whole training set) is
:class:`branchify.md.MDTrainer`, tested in test_md.py; this aggregator is the same teacher built
per batch, usable with any tree, and follows the same weight rule.
"""
import pytest
import torch

from branchify.aggregators import AccuracyWeighted, AggregatorError
from branchify.online_kd import OnlineKD


def test_mixture_teacher_matches_formula(fake_model, output, ref):
    acc = [0.72, 0.65, 0.58]
    out, y = output(k=3), torch.randint(0, 5, (6,))
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, AccuracyWeighted(acc), temperature=3.0)
    a = torch.tensor(acc) / sum(acc)
    s_e = sum(a[i] * torch.softmax(out.logits[i] / 3.0, -1) for i in range(3))
    expected = sum(ref.ce(z, y) for z in out.logits) + sum(ref.kl_probs(s_e, z, 3.0) for z in out.logits)
    assert torch.allclose(okd(model.aggregate(out), y).total, expected, atol=1e-6)


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
    model = fake_model(num_leaves=2)
    okd = OnlineKD(model, AccuracyWeighted([0.5, 0.9]))
    okd.term_loss(model.aggregate(out).targets.kd[0]).backward()
    assert out.logits[1].grad is None
