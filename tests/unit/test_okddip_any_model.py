"""OKDDip on models without a final Linear, and finite attention where the energies overflow.

- SqueezeNet and timm's DLA end in a 1x1 conv classifier: PeerAttention reads the map that conv
  reads, average-pooled, sized from the conv's input channels (nothing asked of the user).
- An eval-mode MNASNet after one SGD step on a batch of two has penultimate features near 1e20
  (its BatchNorm momentum is 3e-4, so the running statistics are still the init's); the unscaled
  energies ``q . k`` then overflow fp32 and the authors' formula, evaluated as written, is NaN.
- In-place dropout after the pooled features (MNASNet) must not overwrite the features the
  attention reads.
- Every model of the spread trains a step at the defaults and exports exactly.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import branchify as bf
from branchify.aggregators import PeerAttention
from branchify.outputs import BranchedOutput

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _okddip(net: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # never-run modules, tied weights
        return bf.method("okddip", net)


def _reference_log_attention(att: PeerAttention, h: torch.Tensor) -> torch.Tensor:
    """The authors' attention in float64: ``log softmax(W_L h (W_E h)^T)`` over peers, self included."""
    h = h.double()
    q, k = h @ att.w_l.weight.double().T, h @ att.w_e.weight.double().T
    return F.log_softmax(q @ k.transpose(-1, -2), dim=-1)


# ---------------------------------------------------------------------- conv classifiers
def test_squeezenet_attention_reads_the_pooled_map_before_its_conv_classifier():
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(num_classes=10).eval()
    model, _ = _okddip(net)
    att = model.aggregator
    assert model.feature_dim is None and model.feature_map_channels == net.classifier[1].in_channels == 512
    assert att.channels == 512 and att.w_l.in_features == 512 and att.proj_dim == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.eval()(x)
        assert all(f is None for f in out.features)
        torch.testing.assert_close(out.feature_maps[0], net.features(x), rtol=0, atol=0)  # leaf 0 = the original
        peers = att.peers(4)
        h = torch.stack([out.feature_maps[k].mean(dim=(2, 3)) for k in peers], dim=-2)
        torch.testing.assert_close(att.attention(out).double(), _reference_log_attention(att, h),
                                   rtol=1e-5, atol=1e-6)


def test_no_features_and_no_maps_names_feature_node():
    att = PeerAttention(channels=8, num_leaves=3, leader=0)
    out = BranchedOutput([torch.randn(2, 5) for _ in range(3)], [None] * 3, [None] * 3)
    with pytest.raises(bf.aggregators.AggregatorError, match="feature_node=<module path>"):
        att(out)


# ---------------------------------------------------------------------- the NaN
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float16, 300.0), (torch.float64, 1.0)])
def test_attention_is_the_authors_value_where_the_energies_overflow(dtype, scale):
    """fp32 energies overflow from features ~1e19, fp16 ones from a few hundred: still the float64 value."""
    torch.manual_seed(0)
    att = PeerAttention(channels=16, num_leaves=4, leader=0).to(dtype)
    feats = [torch.randn(3, 16) * scale for _ in range(4)]
    out = BranchedOutput([torch.randn(3, 5, dtype=dtype) for _ in range(4)], [f.to(dtype) for f in feats], [None] * 4)
    h = torch.stack([out.features[k] for k in att.peers(4)], dim=-2)
    if scale > 1:  # the formula as written overflows here (inf - inf = NaN)
        assert torch.isnan(F.log_softmax(att.w_l(h) @ att.w_e(h).transpose(-1, -2), dim=-1)).any()
    ours = att.attention(out)
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours.double().exp(), _reference_log_attention(att, h).exp(), rtol=0,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)


def test_mnasnet_after_one_step_on_a_batch_of_two_gives_a_finite_eval_loss():
    """The issue's case: one SGD step (lr 0.01, batch 2, 64x64), then the loss in eval mode."""
    torch.manual_seed(11)
    model, okd = _okddip(torchvision.models.mnasnet0_5(num_classes=10))
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    okd.set_epoch(0, 300)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = okd(model(x), y)
    assert torch.isfinite(loss.total), loss.parts
    opt.zero_grad()
    loss.total.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = okd(out, y)
        att = model.aggregator
        h = torch.stack([out.features[k] for k in att.peers(4)], dim=-2)
        assert torch.isnan(att.w_l(h) @ att.w_e(h).transpose(-1, -2)).any()  # the cause is still there
    assert all(torch.isfinite(v) for v in loss.parts.values()), loss.parts


def test_in_place_dropout_does_not_overwrite_the_features():
    """MNASNet's classifier is Dropout(inplace=True) + Linear: the features stay the pre-dropout ones."""
    torch.manual_seed(0)
    net = torchvision.models.mnasnet0_5(num_classes=10)
    model, _ = _okddip(net)
    x = torch.randn(2, 3, 64, 64)
    reference = copy.deepcopy(net).train()
    with torch.no_grad():
        features = reference.layers(x).mean(dim=(2, 3))
        out = model.train().forward_leaves(x)
    torch.testing.assert_close(out.features[0], features, rtol=1e-6, atol=1e-6)
    assert net.classifier[0].inplace and model.export().classifier[0].inplace  # the deployed model is the original


# ---------------------------------------------------------------------- the spread
def _torchvision(name: str, size: int):
    return getattr(torchvision.models, name)(num_classes=10), {"x": torch.randn(2, 3, size, size)}, torch.arange(2)


def _timm_dla():
    timm = pytest.importorskip("timm")
    net = timm.create_model("dla46_c", pretrained=False, num_classes=10)
    assert isinstance(net.fc, torch.nn.Conv2d)  # no final Linear
    return net, {"x": torch.randn(2, 3, 32, 32)}, torch.arange(2)


def _bert():
    from hf_tiny_models import make_batch, make_model
    batch = make_batch("bert", seed=1)
    return make_model("bert"), batch, batch.pop("labels")


SPREAD = {
    "squeezenet1_1": lambda: _torchvision("squeezenet1_1", 64),
    "mnasnet0_5": lambda: _torchvision("mnasnet0_5", 64),
    "mobilenet_v3_small": lambda: _torchvision("mobilenet_v3_small", 32),
    "shufflenet_v2_x0_5": lambda: _torchvision("shufflenet_v2_x0_5", 32),
    "densenet121": lambda: _torchvision("densenet121", 32),
    "timm_dla46_c": _timm_dla,
    "hf_bert": _bert,
}


def _call(module, inputs):
    return module(inputs["x"]) if set(inputs) == {"x"} else module(**inputs)


@pytest.mark.parametrize("name", list(SPREAD))
def test_okddip_at_defaults_trains_a_step_and_exports_exactly(name):
    torch.manual_seed(0)
    net, inputs, labels = SPREAD[name]()
    model, okd = _okddip(net)
    okd.set_epoch(100, 300)  # past the ramp: the attention's KD terms weigh fully
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = okd(_call(model.train(), inputs), labels)
    assert torch.isfinite(loss.total), loss.parts
    opt.zero_grad()
    loss.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.aggregator.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.aggregator.parameters())  # the attention learns
    # Clipped: the plain densenet121 itself takes a gradient of 5e5 on a batch of two 32x32 images
    # (BatchNorm over two values at 1x1) and its eval-mode logits are NaN after that step at lr 0.01.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.eval()
    with torch.no_grad():
        out = _call(model, inputs)
        exported = model.export().eval()
        assert type(exported) is type(net)
        got = _call(exported, inputs)
    got = got.logits if hasattr(got, "logits") else got
    torch.testing.assert_close(got, out.logits[model.target], rtol=0, atol=0)
