"""branchify's PCL equals PCL written by hand (benchmarks/handwritten_pcl.py) step for step.

Both start from the same weights (the hand-written network is copied into the branched model's
segments, its ``en_fc`` into the peer-ensemble teacher, and both temporal means start as copies)
and see the same views of the same batches; the loss of every SGD step, the temporal means they
keep and the deployed model must agree in fp32.
"""
from __future__ import annotations

import torch

import branchify as bf
from benchmarks import handwritten_pcl as hp
from branchify.recipes.zoo import CifarResNet

STEPS = 5
EPOCHS = [0.0, 1.0 / 30, 3.0, 3.5, 4.0]  # of 10: the ramp's e^-5, its bump at "epoch 1 of 300", then full weight


def _net_fn():
    return CifarResNet(8, num_classes=10, in_channels=1)


def _views(x, k):
    return torch.roll(x, shifts=k, dims=-1)


def _load(segment: torch.nn.Module, source: torch.nn.Module) -> None:
    state = source.state_dict()
    segment.load_state_dict({k: state[k] for k in segment.state_dict()}, strict=True)


def _pair():
    torch.manual_seed(0)
    hand = hp.HandPCL(3, net_fn=_net_fn)
    mean = hp.MeanModel(hand)
    branched, okd = bf.method("pcl", _net_fn(), views=_views)
    trunk = _net_fn()
    trunk.conv1, trunk.bn1, trunk.layer1, trunk.layer2 = hand.trunk[0], hand.trunk[1], hand.trunk[3], hand.trunk[4]
    _load(branched.segments["trunk"], trunk)
    for k, head in enumerate(hand.heads):
        net = _net_fn()
        net.layer3, net.fc = head[0], head[3]
        _load(branched.segments[f"b{k}"], net)
    branched.aggregator.parts["pe"].fc.load_state_dict(hand.en_fc.state_dict())
    branched.temporal.model.segments.load_state_dict(branched.segments.state_dict())  # both means start as copies
    branched.temporal.mark_synced()  # the loads are not optimiser steps
    return hand, mean, branched, okd


def test_branchify_pcl_equals_the_hand_written_pcl_step_for_step(one_thread):
    hand, mean, branched, okd = _pair()
    x0 = torch.randn(16, 1, 14, 14)
    views0 = [_views(x0, k) for k in range(3)]
    start = branched(x0)  # train mode: both sides' BatchNorm statistics (temporal means' too) see x0 once
    torch.testing.assert_close(start.logits[1], hand(views0)[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(start.temporal.logits[2], mean(views0)[2], rtol=0, atol=1e-6)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
            for m in (hand, branched)]
    g = torch.Generator().manual_seed(1)
    for step, epoch in enumerate(EPOCHS[:STEPS]):
        okd.set_epoch(epoch, 10)
        x, y = torch.randn(16, 1, 14, 14, generator=g), torch.randint(0, 10, (16,), generator=g)
        views = [_views(x, k) for k in range(3)]
        logits, en = hand(views)
        hand_loss = hp.pcl_loss(logits, en, mean(views), y, w=hp.ramp(epoch, 10))
        out = branched(x)
        ours = okd(out, y).total
        torch.testing.assert_close(ours, hand_loss, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for opt, loss in zip(opts, (hand_loss, ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        mean.update(hand)
    branched(x0)  # applies the last step's update (the hand-written loop did it after the step)
    hand(views0), mean(views0)  # the same forwards on the hand-written side
    assert int(branched.temporal.num_updates) == mean.step == STEPS
    ema = dict(branched.temporal.model.segments.named_parameters())
    torch.testing.assert_close(ema["b2.fc.weight"], mean.net.heads[2][3].weight, rtol=1e-3, atol=1e-5)
    branched.eval(), mean.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(branched.export().eval()(x0), mean.net([x0] * 3)[0][0], rtol=1e-3, atol=1e-4)
