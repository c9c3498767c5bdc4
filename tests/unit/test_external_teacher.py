"""A frozen pre-trained teacher on the loss object (OKDDip+KD): formula, isolation, errors."""
import pytest
import torch
from torch import nn

from branchify.aggregators import PeerAttention
from branchify.online_kd import OnlineKD


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 12), nn.Dropout(0.5), nn.Linear(12, 5))

    def forward(self, x):
        return self.net(x)


def test_external_teacher_term_matches_formula(fake_model, output, ref):
    torch.manual_seed(0)
    teacher, model = Teacher(), fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerAttention(), teacher=teacher, teacher_weight=0.7, teacher_temperature=4.0)
    out, y, x = output(k=4), torch.randint(0, 5, (6,)), torch.randn(6, 12)
    loss = okd(model(out), y, inputs=x)
    with torch.no_grad():
        t = teacher.eval()(x)
    expected = 0.7 * sum(ref.kl(t, z, 4.0) for z in out.logits)
    assert torch.allclose(loss.parts["loss/ext"], expected, atol=1e-6)
    assert torch.allclose(loss.total, loss.parts["loss/ce"] + loss.parts["loss/kd"] + expected, atol=1e-5)


def test_teacher_is_frozen_and_not_part_of_the_model(fake_model, output):
    teacher, model = Teacher(), fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerAttention(), teacher=teacher)
    assert not any(k.startswith("teacher") or ".net." in k for k in model.state_dict())
    assert all(p is not q for p in teacher.parameters() for q in model.parameters())
    teacher.train()  # a stray .train() must not turn dropout on inside the loss
    out = output(k=4)
    x = torch.randn(6, 12)
    loss_a = okd(model(out), torch.randint(0, 5, (6,)), inputs=x)
    loss_a.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    loss_b = okd(model(out), torch.zeros(6, dtype=torch.long), inputs=x)
    assert torch.allclose(loss_a.parts["ext/leaf0"], loss_b.parts["ext/leaf0"])  # deterministic: eval mode


def test_teacher_needs_inputs(fake_model, output):
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerAttention(), teacher=Teacher())
    with pytest.raises(ValueError, match="inputs=x"):
        okd(model(output(k=4)), torch.zeros(6, dtype=torch.long))


def test_teacher_inputs_as_kwargs_and_hf_style_output(fake_model, output):
    class HFTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 5)

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.fc(input_ids)})()

    model = fake_model(num_leaves=2)

    okd = OnlineKD(model, None, teacher=HFTeacher())
    loss = okd(model(output(k=2)), torch.zeros(6, dtype=torch.long), inputs={"input_ids": torch.randn(6, 12)})
    assert "ext/leaf1" in loss.parts and torch.isfinite(loss.total)
