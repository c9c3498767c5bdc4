"""OKDPH: the preset's loss equals a float64 re-implementation of the official code, its defaults are
the code's, and it trains a CIFAR ResNet-20 stably and exports the target."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import branchify as bf
from branchify.fusion import hybrid_state, leaf_states
from branchify.methods import MethodError, get_preset
from branchify.recipes.zoo import resnet20

from conftest import TinyCifarResNet

RTOL = 1e-5


def authors_okdph(students, hybrid, y, omega, beta, T):
    """``tianlizhang/OKDPH@a562089`` ``src/OKDPH.py`` lines 75-88: ``stable_out`` = mean of every
    network's logits (students, then the hybrid), detached; ``loss_hwm = CE(hybrid)``; student ``j``'s
    loss ``omega CE_j + (1 - omega) loss_hwm + beta T^2 KLDiv_batchmean(log_softmax(out_j / T),
    softmax(stable_out / T))``. Summed over the students (each one's optimiser steps on its own)."""
    stable_out = torch.stack([*students, hybrid]).mean(dim=0).detach()
    loss_hwm = F.cross_entropy(hybrid, y)
    total = 0
    for out in students:
        loss_ce = F.cross_entropy(out, y)
        loss_kd = F.kl_div(F.log_softmax(out / T, dim=1), F.softmax(stable_out / T, dim=1),
                           reduction="batchmean") * T * T
        total = total + omega * loss_ce + (1 - omega) * loss_hwm + beta * loss_kd
    return total


@pytest.mark.parametrize("overrides", [{}, {"omega": 0.5, "beta": 0.3, "branches": 3, "temperature": 2.0}])
def test_loss_and_gradients_equal_the_official_code_in_float64(one_thread, overrides):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", **overrides)
    bm.double()
    okd.set_epoch(0, 1)
    o = {**get_preset("okdph").defaults, **overrides}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
    out = bm(x)
    assert out.hybrid.logits[0].dtype == torch.float64 and not out.hybrid.logits[0].requires_grad
    got = okd(out, y).total
    ref = authors_okdph(out.logits, out.hybrid.logits[0], y, o["omega"], o["beta"], o["temperature"])
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)
    grads = torch.autograd.grad(got, out.logits, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, out.logits)
    for a, b in zip(grads, ref_grads):  # relative to the gradient's scale, as tests/unit/test_authors_code.py
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))
    # the hybrid the loss saw is the mean of the students' weights (update_hwm, lines 33-47)
    mixed = hybrid_state(leaf_states(bm), [1 / bm.num_leaves] * bm.num_leaves)
    torch.testing.assert_close(bm.fusion.model.fc.weight, mixed["fc.weight"], rtol=0, atol=0)


def test_defaults_are_the_official_codes():
    d = get_preset("okdph").defaults
    # src/OKDPH.py argparse: --omega 0.8 --beta 0.8 --gamma 0.5 --hwm mean --interval 1_epoch --T 4.0,
    # two resnet32 with the same init (lines 163-185)
    assert (d["omega"], d["beta"], d["gamma"], d["coefficients"], d["fuse_every"], d["temperature"]) == \
        (0.8, 0.8, 0.5, "mean", "1_epoch", 4.0)
    assert (d["branches"], d["init"], d["hybrid_grad"], d["ramp"]) == (2, "copy", False, None)
    with pytest.warns(UserWarning, match="stay identical"):
        bm, okd = bf.method("okdph", TinyCifarResNet())
    assert bm.spec.splits == [bf.INPUT] and bm.num_leaves == 2
    assert okd.ce_weight == 0.8 and okd.kd_weight == 0.8 and okd.ce_weights["hybrid"] == pytest.approx(0.4)
    assert bm.fusion.gamma == 0.5 and bm.fusion.every == (1, "epoch")
    with pytest.raises(MethodError, match="omega=1.5"):
        bf.method("okdph", TinyCifarResNet(), omega=1.5)


def test_trains_a_cifar_resnet20_stably_and_exports_the_target(one_thread):
    torch.manual_seed(0)
    bm, okd = bf.method("okdph", resnet20(num_classes=10), views=bf.views.crop_flip(2))
    opt = torch.optim.SGD(bm.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    losses = []
    for epoch in range(3):
        okd.set_epoch(epoch, 3)  # the hybrid is fused back after epochs 0 and 1
        for _ in range(4):
            loss = okd(bm(x), y)
            opt.zero_grad()
            loss.total.backward()
            opt.step()
            losses.append(float(loss.total.detach()))
            assert all(torch.isfinite(v) for v in loss.parts.values()), loss.parts
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert int(bm.fusion.last_epoch) == 2
    assert not torch.equal(leaf_states(bm)[0]["fc.weight"], leaf_states(bm)[1]["fc.weight"])  # views differ
    bm.eval()
    exported = bm.export().eval()
    assert type(exported).__name__ == "CifarResNet"
    torch.testing.assert_close(exported(x), bm(x).logits[0], rtol=0, atol=1e-6)


def test_paper_options_run(one_thread):
    torch.manual_seed(0)
    bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", hybrid_grad=True, coefficients="dirichlet",
                        fuse_every="1_batch")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = bm(x)
    assert out.hybrid.logits[0].requires_grad  # the hybrid's CE reaches the students
    loss = okd(out, y)
    loss.total.backward()
    assert bm.segments["b1"].get_parameter("fc.weight").grad is not None


@pytest.mark.slow
def test_works_under_torch_compile(one_thread):
    def make():
        torch.manual_seed(0)
        bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", fuse_every="2_batch")
        return bm, okd, torch.optim.SGD(bm.parameters(), lr=0.1)

    (eager, okd_e, opt_e), (model, okd_c, opt_c) = make(), make()
    compiled = torch.compile(model)
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        hybrids = []
        for m, okd, opt in ((eager, okd_e, opt_e), (compiled, okd_c, opt_c)):
            out = m(x)
            loss = okd(out, y).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            hybrids.append(out.hybrid.logits[0])
        torch.testing.assert_close(hybrids[1], hybrids[0], rtol=1e-4, atol=1e-5)
    assert int(model.fusion.steps) == int(eager.fusion.steps) == 3
