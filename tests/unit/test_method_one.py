"""ONE: the gate aggregator and its loss against docs/methods/one.md, and who gets gradient."""
import torch

from branchify.aggregators import Gate
from branchify.online_kd import OnlineKD


def _hand_one(out, gate, y, T, w, ref):
    h = out.cuts[()].mean(dim=(2, 3))
    a = ref.bn_train(h @ gate.fc.weight.T + gate.fc.bias, gate.bn)
    g = torch.softmax(torch.relu(a), dim=1)
    z_e = sum(g[:, k:k + 1] * z for k, z in enumerate(out.logits))
    ce = sum(ref.ce(z, y) for z in out.logits) + ref.ce(z_e, y)
    kd = sum(ref.kl(z_e, z, T) for z in out.logits)
    return ce + w * kd


def test_one_loss_matches_formula(fake_model, output, ref):
    torch.manual_seed(0)
    model = fake_model(num_leaves=3, channels=8)
    okd = OnlineKD(model, Gate(), temperature=3.0, ramp=80 / 300)
    out = output(k=3, channels=8)
    y = torch.randint(0, 5, (6,))
    for epoch in (0, 20, 79, 80, 150):
        okd.set_epoch(epoch, 300)
        loss = okd(model(out), y)
        expected = _hand_one(out, model.aggregator, y, 3.0, ref.ramp(epoch, 80), ref)
        assert torch.allclose(loss.total, expected, atol=1e-6), epoch
        assert abs(loss.parts["ramp"].item() - ref.ramp(epoch, 80)) < 1e-6
    assert set(loss.parts) >= {"ce/leaf0", "ce/leaf2", "ce/teacher", "kd/leaf0", "kd/leaf2", "loss/ce", "loss/kd"}
    assert torch.allclose(loss.parts["loss/ce"] + loss.parts["loss/kd"], loss.total.detach(), atol=1e-6)


def test_gate_is_trained_by_teacher_ce_only_when_detached(fake_model, output):
    model = fake_model(num_leaves=3, channels=8)
    okd = OnlineKD(model, Gate(), ramp=None)
    gate = model.aggregator
    out, y = output(k=3), torch.randint(0, 5, (6,))
    targets = model(out).targets
    okd.term_loss(targets.kd[0]).backward(retain_graph=True)  # a KD term alone
    assert gate.fc.weight.grad is None or gate.fc.weight.grad.abs().sum() == 0
    okd(model(out), y).total.backward()  # CE(z_e) is in the total
    assert gate.fc.weight.grad.abs().sum() > 0


def test_gate_learns_from_kd_when_not_detached(fake_model, output):
    model = fake_model(num_leaves=3, channels=8)
    okd = OnlineKD(model, Gate(detach=False), ramp=None)
    targets = model(output(k=3)).targets
    okd.term_loss(targets.kd[1]).backward()
    assert model.aggregator.fc.weight.grad.abs().sum() > 0


def test_loss_detach_override_beats_aggregator_default(fake_model, output):
    model = fake_model(num_leaves=3, channels=8)
    okd = OnlineKD(model, Gate(detach=False), ramp=None, detach=True)
    okd.term_loss(model(output(k=3)).targets.kd[0]).backward()
    assert model.aggregator.fc.weight.grad is None or model.aggregator.fc.weight.grad.abs().sum() == 0


def test_detached_teacher_sends_no_gradient_to_other_leaves(fake_model, output):
    out = output(k=3)
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Gate(), ramp=None)
    okd.term_loss(model(out).targets.kd[0]).backward()  # leaf 0 learning from the detached teacher
    assert out.logits[0].grad.abs().sum() > 0
    assert out.logits[1].grad is None and out.logits[2].grad is None
