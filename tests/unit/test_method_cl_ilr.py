"""CL-ILR: mean-of-logits teacher with ONE's ramp, against docs/methods/cl_ilr.md."""
import torch

from branchify.aggregators import Mean, PeerMean
from branchify.online_kd import OnlineKD


def test_cl_ilr_loss_matches_formula(fake_model, output, ref):
    out, y = output(k=4), torch.randint(0, 5, (6,))
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, Mean(), temperature=3.0, ramp=80)
    teacher = torch.stack(out.logits).mean(0)
    for epoch in (0, 10, 60, 100):
        okd.set_epoch(epoch)
        expected = (sum(ref.ce(z, y) for z in out.logits)
                    + ref.ramp(epoch, 80) * sum(ref.kl(teacher, z, 3.0) for z in out.logits))
        assert torch.allclose(okd(model(out), y).total, expected, atol=1e-6), epoch


def test_mean_teacher_detached_by_default(fake_model, output):
    out = output(k=3)
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(), ramp=None)
    okd.term_loss(model(out).targets.kd[0]).backward()
    assert out.logits[1].grad is None


def test_mean_teacher_not_detached_passes_gradient_to_peers(fake_model, output):
    out = output(k=3)
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(detach=False), ramp=None)
    okd.term_loss(model(out).targets.kd[0]).backward()
    assert out.logits[1].grad.abs().sum() > 0


def test_peer_mean_teacher_is_the_mean_of_the_other_leaves_not_detached(fake_model, output, ref):
    out, y = output(k=4), torch.randint(0, 5, (6,))
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerMean(), temperature=3.0, ramp=None)
    others = [torch.stack([z for j, z in enumerate(out.logits) if j != k]).mean(0) for k in range(4)]
    expected = sum(ref.ce(z, y) for z in out.logits) + sum(ref.kl(t, z, 3.0) for t, z in zip(others, out.logits))
    assert torch.allclose(okd(model(out), y).total, expected, atol=1e-6)
    okd.term_loss(model(out).targets.kd[0]).backward()  # leaf 0 learning from leaves 1..3
    assert out.logits[1].grad.abs().sum() > 0 and out.logits[0].grad.abs().sum() > 0
