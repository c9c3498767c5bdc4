"""AHBF-style deeper (and shallower) leaves export as the original class with a longer stage."""
from __future__ import annotations

import pytest
import torch
from torch import nn
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


def _truncated(model: Stages, container: str, keep: int) -> Stages:
    """``model`` with the container cut back to its first ``keep`` blocks (same weights otherwise)."""
    short = Stages()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(f"{container}.") or int(k.split(".")[1]) < keep}
    short.load_state_dict(state)
    return short.eval()


def test_identity_init_deepened_leaf_starts_as_the_network_of_original_depth():
    stages = _stages()
    x = torch.randn(2, 3, 8, 8)
    for how, same in (("identity", True), ("standard", False)):
        torch.manual_seed(0)
        bm = bf.branchify(stages, Spec(splits=["layer2"], fanout=[2], deepen={"layer2": [0, 3]}, deepen_init=how))
        deep = bm.export(1).eval()
        assert len(deep.layer2) == 5
        short = _truncated(deep, "layer2", keep=2)
        assert torch.allclose(deep(x), short(x), atol=1e-6) is same, how
        if same:  # only the scale of the appended blocks' last norm starts at 0; it trains
            assert all(float(b.bn.weight.detach().abs().sum()) == 0 for b in deep.layer2[2:])
            assert all(float(b.bn.weight.detach().abs().sum()) > 0 for b in deep.layer2[:2])


def test_identity_init_refuses_blocks_it_cannot_make_the_identity():
    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(2)])
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.body(x))

    with pytest.raises(bf.SpecError, match="deepen_init='standard'"):
        bf.branchify(NoNorm(), Spec(splits=["body"], fanout=[2], deepen={"body": [0, 1]}))
    bm = bf.branchify(NoNorm(), Spec(splits=["body"], fanout=[2], deepen={"body": [0, 1]}, deepen_init="standard"))
    assert len(bm.export(1).body) == 3
    with pytest.raises(bf.SpecError, match="deepen_init='zero' is unknown"):
        Spec(splits=["body"], fanout=[2], deepen_init="zero")
