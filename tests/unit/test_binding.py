"""Aggregators size themselves from the model, attach to model.aggregator, and explain failures."""
import pytest
import torch

from branchify.aggregators import AggregatorError, Gate, HierarchicalTA, Mean, PeerAttention
from branchify.aggregators.base import pool
from branchify.online_kd import OnlineKD


def test_attached_aggregator_trains_with_the_model(fake_model):
    model = fake_model(num_leaves=3, channels=8)
    gate = Gate()
    OnlineKD(model, gate, ramp=None)
    assert model.aggregator is gate  # the model owns it; the loss keeps no reference
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in gate.parameters())
    assert "aggregator.fc.weight" in model.state_dict()
    assert gate.fc.in_features == 8 and gate.fc.out_features == 3


def test_sizes_from_metadata(fake_model):
    model = fake_model(num_leaves=4, channels=12, feature_dim=64, feature_map_channels=32, target=3)
    att = PeerAttention().bind(model)
    assert att.w_l.weight.shape == (8, 64) and att.leader == 3
    ahbf = HierarchicalTA().bind(model)
    assert len(ahbf.fusions) == 3 and ahbf.fusions[0].conv.in_channels == 64


def test_explicit_sizes_without_a_model(output):
    gate = Gate(channels=8, num_leaves=3)
    assert gate(output(k=3)).ce["teacher"].shape == (6, 5)


def test_missing_size_names_the_argument(fake_model, output):
    model = fake_model(num_leaves=3, feature_dim=None, feature_map_channels=None)
    OnlineKD(model, PeerAttention())
    with pytest.raises(AggregatorError, match="channels=<int>"):
        model(output(k=3))
    model.cut_channels = lambda path=(): None
    with pytest.raises(AggregatorError, match="channels=<int>"):
        Gate().bind(model)(output(k=3))


def test_leaf_count_mismatch(fake_model, output):
    gate = Gate().bind(fake_model(num_leaves=3))
    with pytest.raises(AggregatorError, match="new aggregator"):
        gate.bind(fake_model(num_leaves=4))
    with pytest.raises(AggregatorError, match="bound to 3 leaves"):
        Mean().bind(fake_model(num_leaves=3))(output(k=2))
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model)  # no aggregator, so the loss itself sees the wrong leaf count
    with pytest.raises(ValueError, match="the output has 2 leaves but the model this loss was built for has 3"):
        okd(model(output(k=2)), torch.zeros(6, dtype=torch.long))


def test_gate_cut_must_exist(output):
    with pytest.raises(AggregatorError, match="cuts"):
        Gate(channels=8, num_leaves=3, cut=(0,))(output(k=3))


def test_ramp_without_epoch_is_an_error(fake_model, output):
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(), ramp=80)
    with pytest.raises(RuntimeError, match="set_epoch"):
        okd(model(output(k=3)), torch.zeros(6, dtype=torch.long))
    okd.set_step(150, steps_per_epoch=10)  # epoch 15.0
    assert okd.epoch == 15.0
    other = fake_model(num_leaves=3)
    assert OnlineKD(other, Mean())(other(output(k=3)), torch.zeros(6, dtype=torch.long))


def test_loss_argument_errors(fake_model, output):
    with pytest.raises(ValueError, match="temperature"):
        OnlineKD(fake_model(), Mean(), temperature=0)
    with pytest.raises(TypeError, match="BranchedOutput"):
        OnlineKD(fake_model(), Mean())(output(k=3).logits, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="Aggregator"):
        OnlineKD(fake_model(), torch.nn.Linear(2, 2))


def test_pool_layouts():
    assert torch.allclose(pool(torch.ones(2, 8, 3, 3)), torch.ones(2, 8))
    x = torch.randn(2, 5, 8)  # [B, L, C]
    assert torch.allclose(pool(x, 8), x.mean(1))
    y = torch.randn(2, 8, 5)  # [B, C, L]
    assert torch.allclose(pool(y, 8), y.mean(2))
    with pytest.raises(AggregatorError, match="no dim of size 7"):
        pool(torch.randn(2, 8, 5), 7)
