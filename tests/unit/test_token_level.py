"""Token-level outputs ([B, L, C] logits, [B, L] labels with -100 padding) through OnlineKD."""
import torch

from branchify.aggregators import Gate, Mean, PeerAttention
from branchify.online_kd import OnlineKD


def _labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (6, 4), generator=g)
    y[0, 2:] = -100
    y[3, 1:] = -100
    return y


def test_mean_teacher_token_level_matches_hand(fake_model, output, ref):
    out, y = output(k=3, tokens=4), _labels()
    keep = y != -100
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(), temperature=2.0)
    teacher = torch.stack(out.logits).mean(0)
    expected = sum(ref.ce(z[keep], y[keep]) for z in out.logits) \
        + sum(ref.kl(teacher[keep], z[keep], 2.0) for z in out.logits)
    assert torch.allclose(okd(model(out), y).total, expected, atol=1e-6)


def test_padding_positions_get_no_gradient(fake_model, output):
    out, y = output(k=3, tokens=4), _labels()
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(detach=False), temperature=2.0)
    okd(model(out), y).total.backward()
    for z in out.logits:
        assert z.grad[y == -100].abs().sum() == 0
        assert z.grad[y != -100].abs().sum() > 0


def test_gate_and_attention_run_on_token_outputs(fake_model, output):
    y = _labels()
    for agg in (Gate(), PeerAttention()):
        out = output(k=3, tokens=4)
        out.cuts[()] = torch.randn(6, 4, 8)  # [B, L, C] token activations at the cut
        model = fake_model(num_leaves=3, channels=8)
        loss = OnlineKD(model, agg)(model(out), y)
        loss.total.backward()
        assert torch.isfinite(loss.total)
        assert all(z.grad[y == -100].abs().sum() == 0 for z in out.logits)
