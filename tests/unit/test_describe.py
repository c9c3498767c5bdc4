from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm

import branchify as bf
from branchify import Spec


def _flops(model, x):
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def test_describe_counts_params_and_flops_per_leaf_and_in_total():
    net = tvm.resnet18(num_classes=10).eval()
    bm = bf.branchify(net, Spec(splits=["layer3", "layer4"], fanout=[2, [3, 1]]))
    x = torch.randn(2, 3, 32, 32)
    text = bm.describe(x, print_fn=None)
    assert "4 leaves" in text and "(target)" in text and "b0_2" in text
    from branchify.describe import segment_flops

    seg = segment_flops(bm, x)
    leaf0 = seg["trunk"] + seg["b0"] + seg["b0_0"]
    assert leaf0 == _flops(net, x)  # a leaf costs exactly the original model
    n_params = sum(p.numel() for p in net.parameters())
    assert f"{n_params / 1e6:.2f}M" in text
    ratio = sum(seg.values()) / leaf0
    assert f"{ratio:.2f}x forward FLOPs" in text


def test_describe_uses_the_last_forward_shape_when_no_input_is_given():
    bm = bf.branchify(tvm.resnet18(num_classes=10), Spec(splits=["layer4"], fanout=[2]))
    bm(torch.randn(2, 3, 32, 32))
    assert "training cost" in bm.describe(print_fn=None)
