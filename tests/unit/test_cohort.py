"""Cohort: separate networks behind the branched-model interface (DML, OKDDip network-based, Mean,
AccuracyWeighted through OnlineKD unchanged), export / ensemble, and the bad-input errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.aggregators import AccuracyWeighted, Gate, Mean, Pairwise, PeerAttention
from branchify.cohort import CohortError

from peer_models import step_all


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> pool -> fc: one architecture."""

    def __init__(self, classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


class TinyMLP(nn.Module):
    """Flatten -> Linear -> ReLU -> (Dropout -> Linear) classifier: another architecture."""

    def __init__(self, classes: int = 4, hidden: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(self.body(x))


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    return x, y


def _cohort(**kw):
    torch.manual_seed(0)
    return bf.Cohort([TinyCNN(), TinyMLP()], **kw)


def test_forward_gives_logits_and_penultimate_features():
    cohort = _cohort()
    x, _ = _data(8)
    cohort.eval()
    out = cohort(x)
    assert isinstance(out, bf.BranchedOutput) and out.num_leaves == 2 and cohort.num_leaves == 2
    assert cohort.leaf_paths == [(0,), (1,)] and cohort.spec.target == 0
    assert cohort.feature_dims == [6, 10] and cohort.feature_dim is None and cohort.num_classes == 4
    cnn, mlp = cohort.peers
    assert torch.allclose(out.features[0], torch.flatten(cnn.pool(torch.relu(cnn.bn(cnn.conv(x)))), 1))
    assert torch.allclose(out.features[1], mlp.body(x))


def test_features_are_read_before_the_dropout_in_front_of_the_head():
    cohort = _cohort()
    cohort.train()
    x, _ = _data(8)
    out = cohort(x)
    assert torch.allclose(out.features[1], cohort.peers[1].body(x))  # not the dropped-out activations


def test_export_returns_each_peer_as_itself_with_equal_outputs():
    cohort = _cohort()
    x, _ = _data(8)
    cohort.eval()
    out = cohort(x)
    for i, cls in enumerate((TinyCNN, TinyMLP)):
        net = cohort.export(i)
        assert type(net) is cls and net is not cohort.peers[i]
        assert net.state_dict().keys() == cohort.peers[i].state_dict().keys()
        assert torch.equal(net(x), out.logits[i])
        assert not any(m._forward_pre_hooks for m in net.modules())  # feature capture leaves no hooks
    assert type(cohort.export()) is TinyCNN  # default: the target peer
    with pytest.raises(IndexError, match="peers 0..1"):
        cohort.export(2)


def test_cohort_holds_the_networks_themselves():
    a, b = TinyCNN(), TinyMLP()
    cohort = bf.Cohort([a, b])
    assert cohort.peers[0] is a and cohort.peers[1] is b
    assert {id(p) for p in cohort.peer_parameters(1)} == {id(p) for p in b.parameters()}


def test_ensemble_weighted_mean_of_probabilities():
    cohort = _cohort()
    cohort.eval()
    x, _ = _data(8)
    out = cohort(x)
    ens = cohort.ensemble(weights=[3.0, 1.0]).eval()
    expected = 0.75 * out.logits[0].softmax(-1) + 0.25 * out.logits[1].softmax(-1)
    assert torch.allclose(ens(x), expected, atol=1e-6)


def test_dml_on_two_different_architectures_reduces_its_loss():
    cohort = _cohort()
    okd = bf.OnlineKD(cohort, Pairwise(), temperature=1.0)
    opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.1, momentum=0.9) for i in range(2)]
    assert not list(cohort.shared_parameters())
    x, y = _data(32)
    losses = []
    for _ in range(25):
        loss = okd(cohort(x), y)
        losses.append(step_all(loss.total, opts))
    assert set(loss.parts) >= {"kd/leaf0<-leaf1", "kd/leaf1<-leaf0", "ce/leaf0", "ce/leaf1"}
    assert losses[-1] < 0.7 * losses[0]


def test_dml_gradient_of_each_peer_is_its_own_ce_and_kl(ref):
    cohort = _cohort()
    cohort.eval()  # no dropout: the reference below recomputes the same logits
    okd = bf.OnlineKD(cohort, Pairwise(), temperature=2.0)
    x, y = _data(16)
    okd(cohort(x), y).total.backward()
    got = cohort.peers[0].fc.weight.grad.clone()
    cohort.zero_grad()
    z0, z1 = cohort.peers[0](x), cohort.peers[1](x).detach()
    (ref.ce(z0, y) + ref.kl(z1, z0, 2.0)).backward()
    assert torch.allclose(got, cohort.peers[0].fc.weight.grad, atol=1e-6)


def test_mean_and_accuracy_weighted_teachers_run_on_a_cohort():
    x, y = _data(16)
    for agg in (Mean(), AccuracyWeighted([70.0, 30.0])):
        cohort = _cohort()
        loss = bf.OnlineKD(cohort, agg)(cohort(x), y)
        loss.total.backward()
        assert {"kd/leaf0", "kd/leaf1"} <= set(loss.parts)
        assert all(p.grad is not None for p in cohort.peer_parameters(1))


def test_peer_attention_needs_a_common_feature_width():
    with pytest.raises(CohortError, match=r"widths differ \(peer 0 \(TinyCNN\) 6, peer 1 \(TinyMLP\) 10\).*"
                                          r"project_features"):
        bf.OnlineKD(_cohort(), PeerAttention())


def test_peer_attention_with_projected_features_trains_projection_and_attention():
    torch.manual_seed(0)
    cohort = bf.Cohort([TinyCNN(), TinyMLP(), TinyCNN(width=4)], project_features=8)
    assert cohort.feature_dim == 8
    okd = bf.OnlineKD(cohort, PeerAttention(), temperature=3.0)
    x, y = _data(16)
    out = cohort(x)
    assert [tuple(f.shape) for f in out.features] == [(16, 8)] * 3
    okd(out, y).total.backward()
    shared = dict(cohort.named_parameters())
    for name in ("aggregator.w_l.weight", "aggregator.w_e.weight", "projections.1.weight"):
        assert shared[name].grad is not None and shared[name].grad.abs().sum() > 0, name
    assert len(list(cohort.shared_parameters())) == 5  # 3 projections + W_L + W_E
    assert set(cohort.export(1).state_dict()) == set(cohort.peers[1].state_dict())  # no projection in export


def test_different_class_counts_are_rejected_naming_each_count():
    with pytest.raises(CohortError, match=r"peer 0 \(TinyCNN\): 4 classes, peer 1 \(TinyMLP\): 3 classes"):
        bf.Cohort([TinyCNN(classes=4), TinyMLP(classes=3)])


def test_class_count_from_logits_when_a_peer_has_no_linear():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 8)

        def forward(self, x):
            return self.conv(x).flatten(1)

    cohort = bf.Cohort([TinyCNN(classes=4), Conv()])
    assert cohort.feature_dims == [6, None]
    with pytest.raises(CohortError, match=r"peer 0 \(TinyCNN\): 4 classes, peer 1 \(Conv\): 3 classes"):
        cohort(_data(2)[0])


def test_wrong_head_is_reported():
    class TwoHeads(nn.Module):  # registers an auxiliary Linear after the real classifier
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)
            self.aux = nn.Linear(64, 7)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(CohortError, match="7 classes"):
        bf.Cohort([TinyCNN(), TwoHeads()])
    cohort = bf.Cohort([TinyCNN(), TwoHeads()], heads=[None, "fc"])
    assert cohort(_data(2)[0]).features[1].shape == (2, 64)
    with pytest.raises(CohortError, match="no module 'head'"):
        bf.Cohort([TinyCNN(), TwoHeads()], heads=[None, "head"])


def test_bad_peers_and_aggregators():
    net = TinyCNN()
    with pytest.raises(CohortError, match="same module object"):
        bf.Cohort([net, net])
    with pytest.warns(UserWarning, match="identical weights"):
        bf.Cohort([net, copy.deepcopy(net)])
    with pytest.raises(CohortError, match="Gate needs a shared trunk"):
        bf.OnlineKD(_cohort(), Gate())
    with pytest.raises(CohortError, match="target=2"):
        bf.Cohort([TinyCNN(), TinyMLP()], target=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf.Cohort([TinyCNN(), TinyCNN()])  # separately initialised: no warning


def test_torchvision_peers():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    cohort = bf.Cohort([tv.models.resnet18(num_classes=5), tv.models.mobilenet_v3_small(num_classes=5)])
    assert cohort.head_paths == ["fc", "classifier.3"] and cohort.feature_dims == [512, 1024]
    cohort.eval()
    x = torch.randn(2, 3, 32, 32)
    out = cohort(x)
    assert out.features[1].shape == (2, 1024)
    net = cohort.export(1)
    assert type(net) is tv.models.MobileNetV3 and torch.equal(net(x), out.logits[1])
