"""TSA / U-TSA and DML: pairwise peer distillation with detached peers."""
import torch

from branchify.aggregators import Pairwise
from branchify.online_kd import OnlineKD


def _hand_pairwise(logits, y, T, a, ref):
    K = len(logits)
    total = 0.0
    for k in range(K):
        kd = sum(ref.kl(logits[j], logits[k], T) for j in range(K) if j != k) / (K - 1)
        total = total + (1 - a) * ref.ce(logits[k], y) + a * kd
    return total


def test_tsa_loss_matches_formula(fake_model, output, ref):
    out, y = output(k=4), torch.randint(0, 5, (6,))
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, Pairwise(), temperature=3.0, ce_weight=0.5, kd_weight=0.5)
    assert torch.allclose(okd(model(out), y).total, _hand_pairwise(out.logits, y, 3.0, 0.5, ref), atol=1e-6)
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, Pairwise(), temperature=3.0, ce_weight=0.7, kd_weight=0.3)
    assert torch.allclose(okd(model(out), y).total, _hand_pairwise(out.logits, y, 3.0, 0.3, ref), atol=1e-6)


def test_dml_loss_matches_formula(fake_model, output, ref):
    out, y = output(k=2, scale=2.0), torch.randint(0, 5, (6,))
    model = fake_model(num_leaves=2)
    okd = OnlineKD(model, Pairwise(), temperature=1.0)
    expected = sum(ref.ce(z, y) for z in out.logits) + ref.kl(out.logits[1], out.logits[0], 1.0) \
        + ref.kl(out.logits[0], out.logits[1], 1.0)
    assert torch.allclose(okd(model(out), y).total, expected, atol=1e-6)


def test_peers_are_detached(fake_model, output):
    out = output(k=3)
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Pairwise())
    targets = model(out).targets
    assert [t.weight for t in targets.kd] == [0.5] * 6
    okd.term_loss(targets.kd[0]).backward()  # leaf0 <- leaf1
    assert out.logits[0].grad.abs().sum() > 0 and out.logits[1].grad is None


def test_not_detached_peers_learn_from_both_sides(fake_model, output):
    out = output(k=2)
    model = fake_model(num_leaves=2)
    okd = OnlineKD(model, Pairwise(detach=False))
    okd.term_loss(model(out).targets.kd[0]).backward()
    assert out.logits[1].grad.abs().sum() > 0
