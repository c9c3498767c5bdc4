"""AHBF-style deeper (and shallower) leaves export as the original class with a longer stage."""
from __future__ import annotations

import torch
from torchvision import models as tvm

import branchify as bf
from toy_models import Stages, ToyResidual
from branchify import Spec


def test_ahbf_tree_deepens_leaves_and_exports_each_exactly():
    stages = _stages()
    torch.manual_seed(0)
    spec = Spec(splits=["layer2"], fanout=[3], deepen={"layer2": [0, 1, 3]})
    bm = bf.branchify(stages, spec).eval()
    x = torch.randn(2, 3, 8, 8)
    out = bm(x)
    for leaf, extra in enumerate([0, 1, 3]):
        exported = bm.export(leaf).eval()
        assert type(exported) is type(stages)
        assert len(exported.layer2) == 2 + extra
        torch.testing.assert_close(exported(x), out.logits[leaf], atol=1e-5, rtol=0)
    # the deeper leaves really compute more: their segments hold more parameters
    sizes = [sum(p.numel() for p in bm.segments[f"b{i}"].parameters()) for i in range(3)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_negative_deepen_removes_trailing_blocks():
    stages = _stages()
    spec = Spec(splits=["layer2"], fanout=[2], deepen={"layer2": [0, -1]})
    bm = bf.branchify(stages, spec).eval()
    x = torch.randn(2, 3, 8, 8)
    exported = bm.export(1).eval()
    assert len(exported.layer2) == 1
    torch.testing.assert_close(exported(x), bm(x).logits[1], atol=1e-5, rtol=0)


def test_deepened_torchvision_resnet_exports_as_a_deeper_resnet():
    torch.manual_seed(0)
    spec = Spec(splits=["layer4"], fanout=[2], deepen={"layer4": [0, 2]})
    bm = bf.branchify(tvm.resnet18(num_classes=5), spec).eval()
    x = torch.randn(2, 3, 32, 32)
    deep = bm.export(1).eval()
    assert isinstance(deep, tvm.ResNet) and len(deep.layer4) == 4
    torch.testing.assert_close(deep(x), bm(x).logits[1], atol=1e-5, rtol=0)
    # and it loads strictly into a fresh torchvision ResNet configured [2, 2, 2, 4]
    fresh = tvm.ResNet(tvm.resnet.BasicBlock, [2, 2, 2, 4], num_classes=5)
    fresh.load_state_dict(bm.export_state_dict(1), strict=True)


def _stages() -> Stages:
    torch.manual_seed(0)
    return Stages()
