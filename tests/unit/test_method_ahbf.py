"""AHBF-OKD: recursive teacher assistants and their loss against docs/methods/ahbf.md."""
import pytest
import torch

from branchify.aggregators import AggregatorError, HierarchicalTA
from branchify.online_kd import OnlineKD


def _hand_ahbf(out, agg, y, T, w, lambdas, ref, own_ta=True):
    l1, l2 = lambdas
    fused, z_ta = out.feature_maps[0], out.logits[0]
    ce = sum(ref.ce(z, y) for z in out.logits)
    kd = 0.0
    for m in range(1, len(out.logits)):
        f = agg.fusions[m - 1]
        x = torch.cat([fused, out.feature_maps[m]], dim=1)
        conv = torch.einsum("oi,bihw->bohw", f.conv.weight[:, :, 0, 0], x) + f.conv.bias.view(1, -1, 1, 1)
        fused = ref.bn_train(conv, f.bn)
        a = ref.bn_train(fused.mean(dim=(2, 3)) @ f.fc.weight.T + f.fc.bias, f.bn_gate)
        s = torch.softmax(torch.relu(a), dim=1)
        z_new = s[:, :1] * z_ta + s[:, 1:] * out.logits[m]
        ce = ce + ref.ce(z_new, y)
        kd = kd + l1 * ref.kl(z_new, z_ta, T) + l2 * ref.kl(out.logits[m], z_ta, T)
        if own_ta:  # the authors' code: branch m also learns from its own TA
            kd = kd + l1 * ref.kl(z_new, out.logits[m], T)
        z_ta = z_new
    return ce + w * kd


@pytest.mark.parametrize("own_ta", [True, False])
@pytest.mark.parametrize("lambdas", [(4.0, 2.0), (2.0, 4.0)])
def test_ahbf_loss_matches_formula(fake_model, output, ref, lambdas, own_ta):
    model = fake_model(num_leaves=4, feature_map_channels=16)
    okd = OnlineKD(model, HierarchicalTA(lambdas=lambdas, own_ta=own_ta), temperature=3.0, ramp=1.0)
    out, y = output(k=4, feat=16), torch.randint(0, 5, (6,))
    for epoch in (0, 150, 299):
        okd.set_epoch(epoch, 300)
        loss = okd(model(out), y)
        expected = _hand_ahbf(out, model.aggregator, y, 3.0, ref.ramp(epoch, 300), lambdas, ref, own_ta)
        assert torch.allclose(loss.total, expected, atol=1e-6), epoch
    assert {"ce/ta1", "ce/ta3", "kd/ta0<-ta1", "kd/ta2<-leaf3"} <= set(loss.parts)
    assert ("kd/leaf3<-ta3" in loss.parts) == own_ta


def test_nothing_detached_fusion_learns_from_kd(fake_model, output):
    model = fake_model(num_leaves=3, feature_map_channels=16)
    okd = OnlineKD(model, HierarchicalTA(), ramp=None)
    out = output(k=3, feat=16)
    term = model(out).targets.kd[0]  # lambda1 * KL(p_ta1 || p_ta0)
    okd.term_loss(term).backward()
    assert model.aggregator.fusions[0].conv.weight.grad.abs().sum() > 0
    assert out.logits[1].grad.abs().sum() > 0  # leaf 1 is inside the teacher TA(1)


def test_without_maps_the_features_fuse_as_1x1_maps(output):
    """A transformer reports no feature map: its [B, C] features (or [B, L, C] token features)
    fuse as [B, C, 1, 1] ([B, C, L, 1]) maps - the same targets as passing those maps."""
    torch.manual_seed(0)
    agg = HierarchicalTA(channels=16, num_leaves=3)
    out = output(k=3, feat=16)
    out.feature_maps = [None] * 3
    as_maps = output(k=3, feat=16)
    as_maps.logits, as_maps.features = out.logits, out.features
    as_maps.feature_maps = [f[:, :, None, None] for f in out.features]
    got, want = agg(out), agg(as_maps)
    for name in want.ce:
        torch.testing.assert_close(got.ce[name], want.ce[name], rtol=0, atol=0)
    tokens = [torch.randn(4, 5, 16) for _ in range(3)]
    out.features, out.logits = tokens, [torch.randn(4, 5, 7) for _ in range(3)]
    as_maps.features, as_maps.logits = tokens, out.logits
    as_maps.feature_maps = [t.transpose(1, 2).unsqueeze(-1) for t in tokens]
    torch.testing.assert_close(agg(out).ce["ta2"], agg(as_maps).ce["ta2"], rtol=0, atol=0)


def test_needs_feature_maps_and_two_leaves(output):
    out = output(k=3, feat=16)
    out.feature_maps, out.features = [None] * 3, [None] * 3
    with pytest.raises(AggregatorError, match="feature_node="):
        HierarchicalTA(channels=16, num_leaves=3)(out)
    with pytest.raises(AggregatorError, match="at least 2"):
        HierarchicalTA(channels=16, num_leaves=1)
    with pytest.raises(AggregatorError, match="channels="):
        HierarchicalTA()(output(k=3))


def test_channels_last_maps_fuse_as_channels_first(output):
    """timm's Swin reports its pre-pool map as [B, H, W, C]: it fuses as the [B, C, H, W] map."""
    torch.manual_seed(0)
    agg = HierarchicalTA(channels=16, num_leaves=3)
    first = output(k=3, feat=16)
    last = output(k=3, feat=16)
    last.logits, last.features = first.logits, first.features
    last.feature_maps = [f.permute(0, 2, 3, 1) for f in first.feature_maps]
    assert last.feature_maps[0].shape[-1] == 16 != last.feature_maps[0].shape[1]
    torch.testing.assert_close(agg(last).ce["ta2"], agg(first).ce["ta2"], rtol=0, atol=0)
