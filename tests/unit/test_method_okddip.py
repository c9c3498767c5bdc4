"""OKDDip: peer attention targets (logit and probability space), leader, gradient flow."""
import pytest
import torch

from branchify.aggregators import AggregatorError, PeerAttention
from branchify.online_kd import OnlineKD


def _hand_attention(out, agg, peers):
    h = torch.stack([out.features[k] for k in peers], dim=1)  # [B, P, C]
    q = h @ agg.w_l.weight.T
    k = h @ agg.w_e.weight.T
    return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # [B, P, P], no sqrt(d)


def test_okddip_logit_space_loss_matches_formula(fake_model, output, ref):
    model = fake_model(num_leaves=4, feature_dim=16, target=0)
    okd = OnlineKD(model, PeerAttention(), temperature=3.0, ramp=80 / 300)
    agg = model.aggregator
    assert agg.leader == 0 and agg.w_l.weight.shape == (2, 16)
    out, y = output(k=4), torch.randint(0, 5, (6,))
    peers = [1, 2, 3]
    alpha = _hand_attention(out, agg, peers)
    z = torch.stack([out.logits[k] for k in peers], dim=1)  # [B, P, C]
    targets = alpha @ z
    kd = sum(ref.kl(targets[:, i], out.logits[a], 3.0) for i, a in enumerate(peers))
    kd = kd + ref.kl(z.mean(1), out.logits[0], 3.0)
    ce = sum(ref.ce(zk, y) for zk in out.logits)
    for epoch in (0, 40, 100):
        okd.set_epoch(epoch, 300)
        assert torch.allclose(okd(model(out), y).total, ce + ref.ramp(epoch, 80) * kd, atol=1e-6)


def test_okddip_prob_space_loss_matches_paper(fake_model, output, ref):
    model = fake_model(num_leaves=4, target=2)
    okd = OnlineKD(model, PeerAttention(space="prob"), temperature=3.0, ramp=None)
    agg = model.aggregator
    assert agg.leader == 2
    out, y = output(k=4, seed=5), torch.randint(0, 5, (6,))
    peers = [0, 1, 3]
    alpha = _hand_attention(out, agg, peers)
    p = torch.stack([torch.softmax(out.logits[k] / 3.0, -1) for k in peers], dim=1)  # [B, P, C]
    t = alpha @ p
    kd = sum(ref.kl_probs(t[:, i], out.logits[a], 3.0) for i, a in enumerate(peers))
    kd = kd + ref.kl_probs(p.mean(1), out.logits[2], 3.0)
    ce = sum(ref.ce(zk, y) for zk in out.logits)
    assert torch.allclose(okd(model(out), y).total, ce + kd, atol=1e-6)


@pytest.mark.parametrize("space", ["logits", "prob"])
def test_attention_projections_learn_through_targets(fake_model, output, space):
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerAttention(space=space), ramp=None)
    out = output(k=4)
    okd.term_loss(model(out).targets.kd[0]).backward()  # peer 1 distilling from its target
    assert model.aggregator.w_l.weight.grad.abs().sum() > 0
    assert model.aggregator.w_e.weight.grad.abs().sum() > 0
    assert out.logits[2].grad.abs().sum() > 0  # peers also get gradient through others' targets


def test_detached_targets_freeze_attention(fake_model, output):
    model = fake_model(num_leaves=4)
    okd = OnlineKD(model, PeerAttention(detach=True), ramp=None)
    out = output(k=4)
    okd.term_loss(model(out).targets.kd[0]).backward()
    assert model.aggregator.w_l.weight.grad is None
    assert out.logits[2].grad is None


def test_no_leader_mode_and_errors(fake_model, output):
    agg = PeerAttention(channels=16, num_leaves=3, leader=None)
    assert [t.name for t in agg(output(k=3)).kd] == ["leaf0", "leaf1", "leaf2"]
    with pytest.raises(AggregatorError, match="not resolved"):
        PeerAttention(channels=16)(output(k=3))
    with pytest.raises(AggregatorError, match="channels="):
        PeerAttention(leader=0)(output(k=3))
    with pytest.raises(AggregatorError, match="space"):
        PeerAttention(space="probs")
    out = output(k=3)
    out.features = [None] * 3
    out.feature_maps = [None] * 3  # with maps (a conv classifier's input) the attention pools them
    with pytest.raises(AggregatorError, match="feature_node"):
        PeerAttention(channels=16, leader=0)(out)
