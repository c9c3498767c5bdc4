"""Every supported model family goes through the same contract (timm-style uniform checks)."""
from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

import branchify as bf
from branchify.recipes.zoo import resnet32

from toy_models import ToyResidual


def _vit_b_16():
    # The real ViT-B/16 architecture (12 layers, 768 wide) on a small 32x32 input.
    return tvm.vit_b_16(image_size=32, num_classes=10)


# name -> (factory, splits of a two-level tree (or one), input size)
CASES = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), ["layer3", "layer4"], 32),
    "resnet50": (lambda: tvm.resnet50(num_classes=10), ["layer4"], 32),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), ["features.9", "features.11"], 32),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), ["features.6", "features.7"], 32),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), ["features.5"], 32),
    "vit_b_16": (_vit_b_16, ["encoder.layers.encoder_layer_10"], 32),
    "cifar_resnet32": (lambda: resnet32(num_classes=10), ["layer2", "layer3"], 32),
    "toy_residual_cut_inside_block": (lambda: ToyResidual(num_classes=10), ["block.conv2"], 8),
    "dml_whole_networks": (lambda: resnet32(num_classes=10), ["<input>"], 16),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    factory, splits, size = CASES[request.param]
    net = factory().eval()
    spec = bf.Spec(splits=splits, fanout=[2] * len(splits))
    bm = bf.branchify(net, spec)
    x = torch.randn(2, 3, size, size)
    return request.param, net, bm, x


def test_one_logits_tensor_per_leaf(case):
    name, net, bm, x = case
    out = bm(x)
    assert len(out.logits) == bm.spec.num_leaves == 2 ** len(bm.spec.splits)
    assert all(z.shape == (2, 10) for z in out.logits)
    assert all(f is not None and f.shape[0] == 2 and f.ndim == 2 for f in out.features)
    assert out.leaf_paths == bm.spec.leaf_paths()


def test_leaf0_starts_as_the_original_model_and_the_user_model_is_untouched(case):
    name, net, bm, x = case
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = bm.eval()(x)
    torch.testing.assert_close(out.logits[0], net(x), atol=1e-5, rtol=0)
    out.logits[0].sum().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_leaves_differ_at_init(case):
    name, net, bm, x = case
    out = bm.eval()(x)
    # ViT zero-initialises its head, so its logits agree at init; the features must not.
    f0, f1 = out.features[0], out.features[1]
    assert (f0 - f1).abs().max() > 1e-3 * f0.abs().max()
    last = [k for k in bm.segments if k.count("_") == len(bm.spec.splits) - 1 and k != "trunk"]
    p0 = torch.cat([p.flatten() for p in bm.segments[last[0]].parameters()])
    p1 = torch.cat([p.flatten() for p in bm.segments[last[1]].parameters()])
    assert not torch.equal(p0, p1)


@pytest.mark.parametrize("leaf", [0, -1])
def test_export_is_the_original_class_with_equal_outputs(case, leaf):
    name, net, bm, x = case
    bm.eval()
    leaf = leaf % bm.num_leaves
    exported = bm.export(leaf).eval()
    assert type(exported) is type(net)
    assert exported.state_dict().keys() == net.state_dict().keys()
    type(net)  # strict load into a fresh instance of the same class too
    exported.load_state_dict(bm.export_state_dict(leaf), strict=True)
    torch.testing.assert_close(exported(x), bm(x).logits[leaf], atol=1e-5, rtol=0)


def test_ensemble_averages_leaf_probabilities(case):
    name, net, bm, x = case
    bm.eval()
    ens = bm.ensemble().eval()
    out = bm(x)
    expected = torch.stack([z.softmax(-1) for z in out.logits]).mean(0)
    torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=0)
