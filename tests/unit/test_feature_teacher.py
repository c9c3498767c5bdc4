"""Feature teachers (FeatureFusion) and Compose: sizes at bind time, loss and gradients vs the reference formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf
from branchify.aggregators import AggregatorError, Compose, FeatureFusion, Mean, Pairwise

RTOL = 1e-5


def kd_loss(pred, target, T=3.0):
    """PCL reproduction ``src/losses/kd_loss.py`` lines 15-26:
    ``T^2 * KLDiv(batchmean)(log_softmax(p/T), softmax(t/T))``."""
    p = F.softmax(target / T, dim=1)
    return T * T * (p * (p.log() - F.log_softmax(pred / T, dim=1))).sum(1).mean()


def ce(z, y):
    return -F.log_softmax(z, dim=1).gather(1, y[:, None]).mean()


def peer_ensemble_reference(out, fc, y, T=3.0):
    """``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473``: ``en_fc`` on the
    concatenated peer features (``src/models/resnet.py`` lines 217-219), ``CE(pred_en)`` plus per peer
    ``CE + KDLoss(pred_k, en_output.detach())`` (``src/losses/loss_wrapper.py`` lines 41-58 without the
    temporal-mean term and the ramp; ``src/controller.py`` line 42 detaches the ensemble)."""
    en = torch.cat(list(out.features), dim=1) @ fc.weight.T + fc.bias
    loss = ce(en, y)
    for z in out.logits:
        loss = loss + ce(z, y) + kd_loss(z, en.detach(), T)
    return loss


def _tree(tiny_resnet, fanout=3, splits=("layer3",)):
    torch.manual_seed(0)
    return bf.branchify(tiny_resnet(num_classes=5), bf.Spec(splits=list(splits), fanout=[fanout] * len(splits)))


def test_loss_and_gradients_equal_the_peer_ensemble_reference(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet)
    okd = bf.OnlineKD(bm, FeatureFusion(), temperature=3.0)
    bm.double().train()
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    out = bm(x)
    ours = okd(out, y).total
    theirs = peer_ensemble_reference(out, bm.aggregator.fc, y)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    wrt = list(out.logits) + list(out.features) + list(bm.aggregator.parameters())
    g_ours = torch.autograd.grad(ours, wrt, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, wrt)
    scale = max(float(g.abs().max()) for g in g_theirs)
    for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=f"gradient {i}")


def test_the_teacher_ce_trains_the_features_and_the_kd_does_not_reach_the_fused_head(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet)
    okd = bf.OnlineKD(bm, FeatureFusion(), temperature=3.0)
    out = bm(torch.randn(4, 3, 16, 16))
    kd = sum(okd.term_loss(t) for t in out.targets.kd)
    assert torch.autograd.grad(kd, bm.aggregator.fc.weight, allow_unused=True)[0] is None
    teacher_ce = F.cross_entropy(out.targets.ce["teacher"], torch.zeros(4, dtype=torch.long))
    assert torch.autograd.grad(teacher_ce, out.features[1])[0].abs().sum() > 0


def test_sizes_come_from_the_model(tiny_resnet):
    bm = _tree(tiny_resnet, fanout=4)
    agg = bm.attach(FeatureFusion())
    assert (bm.feature_dim, bm.num_classes) == (16, 5)
    assert (agg.fc.in_features, agg.fc.out_features) == (4 * 16, 5)
    sub = bm.attach(FeatureFusion(leaves=[0, 2]))
    assert sub.fc.in_features == 2 * 16 and sub(bm(torch.randn(2, 3, 16, 16))).ce["teacher"].shape == (2, 5)
    maps = bm.attach(FeatureFusion(source="feature_maps", kd=False))
    targets = maps(bm(torch.randn(2, 3, 16, 16)))
    assert maps.fc.in_features == 4 * 16 and targets.kd == []


class ConvHead(nn.Module):
    """A SqueezeNet-style classifier: a 1x1 convolution to the classes, then global pooling."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.classifier = nn.Sequential(nn.Conv2d(6, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def test_a_conv_classifier_fuses_its_pooled_input_maps(one_thread):
    torch.manual_seed(0)
    bm = bf.branchify(ConvHead(), bf.Spec(splits=["features.2"], fanout=[3]))
    assert (bm.feature_dim, bm.feature_map_channels, bm.num_classes) == (None, 6, 5)
    agg = bm.attach(FeatureFusion())
    assert agg.source == "feature_maps" and (agg.fc.in_features, agg.fc.out_features) == (3 * 6, 5)
    out = bm(torch.randn(2, 3, 8, 8))
    h = torch.cat([m.mean(dim=(2, 3)) for m in out.feature_maps], dim=1)
    torch.testing.assert_close(out.targets.ce["teacher"], agg.fc(h))


def test_peers_of_different_widths_concatenate(one_thread):
    a = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    b = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    cohort = bf.Cohort([a, b])
    agg = cohort.attach(FeatureFusion())
    assert (agg.fc.in_features, agg.fc.out_features) == (7 + 6, 3)
    out = cohort(torch.randn(5, 6))
    assert out.targets.ce["teacher"].shape == (5, 3) and len(out.targets.kd) == 2


def test_any_tree_by_hand_with_online_kd(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet, fanout=2, splits=("layer2", "layer3"))  # TSA's tree: 4 leaves
    okd = bf.OnlineKD(bm, FeatureFusion(), temperature=2.0)
    loss = okd(bm(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
    loss.total.backward()
    assert bm.aggregator.fc.in_features == 4 * 16 and bm.aggregator.fc.weight.grad is not None
    assert sorted(k for k in loss.parts if k.startswith("kd/")) == [f"kd/leaf{k}" for k in range(4)]


def test_missing_sizes_and_bad_options_are_explained(fake_model, output):
    model = fake_model()
    with pytest.raises(AggregatorError, match="num_classes=<int>"):
        model.attach(FeatureFusion())(output())
    with pytest.raises(AggregatorError, match="source="):
        FeatureFusion(source="logits")
    with pytest.raises(AggregatorError, match="names leaves \\[5\\]"):
        FeatureFusion(in_features=16, num_classes=5, num_leaves=3, leaves=[0, 5])
    with pytest.raises(AggregatorError, match="one per leaf"):
        FeatureFusion(in_features=[16, 16], num_classes=5, num_leaves=3)
    out = bf.BranchedOutput([torch.randn(2, 5)] * 3, [None] * 3, [None] * 3)
    with pytest.raises(AggregatorError, match="feature_node"):
        FeatureFusion(in_features=16, num_classes=5, num_leaves=3)(out)


def test_compose_renames_and_sums_its_parts(fake_model, output):
    fake_model, output = fake_model(), output()
    both = fake_model.attach(Compose(pe=FeatureFusion(num_classes=5), pair=Pairwise()))
    okd = bf.OnlineKD(fake_model, temperature=3.0)
    loss = okd(fake_model(output), torch.randint(0, 5, (6,)))
    assert "ce/pe/teacher" in loss.parts and "kd/pe/leaf0" in loss.parts and "kd/pair/leaf0<-leaf1" in loss.parts
    kd = sum(t.weight * okd.term_loss(t) for t in fake_model(output).targets.kd)
    torch.testing.assert_close(loss.parts["loss/kd"], kd.detach())
    assert both.parts["pe"].fc.in_features == 3 * 16
    with pytest.raises(AggregatorError, match="not a branchify"):
        Compose(a=Mean(), b=nn.Linear(2, 2))
    with pytest.raises(AggregatorError, match="at least one"):
        Compose()
