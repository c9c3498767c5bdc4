"""A float64 model computes its whole loss in float64: parameter-free aggregators and the ramp
weight follow the logits' dtype (they used to run in float32, ~1e-7 away from the authors' code).

The reference is CL-ILR's documented loss (docs/methods/cl_ilr.md) written out with plain torch
ops in float64 and the ramp in Python floats: ``sum_k CE(z_k) + w(e) T^2 sum_k KL(softmax(t_k/T) ||
softmax(z_k/T))`` with ``t_k`` the mean of the other leaves' logits, nothing detached. CL-ILR uses
both pieces at once: ``PeerMean`` has no parameters and the ramp is 80/300 of the run.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import branchify as bf

T = 3.0


def reference_cl_ilr(logits: list[torch.Tensor], y: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
    k = len(logits)
    length = 80 / 300 * epochs
    w = math.exp(-5.0 * (1.0 - min(epoch, length) / length) ** 2)
    loss = sum(F.cross_entropy(z, y) for z in logits)
    for i, z in enumerate(logits):
        teacher = sum(logits[j] for j in range(k) if j != i) / (k - 1)
        log_t, log_s = F.log_softmax(teacher / T, dim=1), F.log_softmax(z / T, dim=1)
        loss = loss + w * T * T * (log_t.exp() * (log_t - log_s)).sum(1).mean()
    return loss


@pytest.fixture
def float64_cl_ilr(tiny_resnet):
    torch.manual_seed(0)
    model, okd = bf.method("cl_ilr", tiny_resnet(num_classes=5), model_fn=lambda: tiny_resnet(num_classes=5))
    model = model.double().train()
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    return model, okd, x, y


@pytest.mark.parametrize("epoch", [0, 40, 299])
def test_float64_loss_matches_the_formula_to_1e_12(float64_cl_ilr, epoch):
    model, okd, x, y = float64_cl_ilr
    out = model(x)
    okd.set_epoch(epoch, 300)
    loss = okd(out, y)
    ref = reference_cl_ilr(list(out.logits), y, epoch, 300)
    assert loss.total.dtype == torch.float64 and loss.parts["ramp"].dtype == torch.float64
    assert all(term.teacher.dtype == torch.float64 for term in out.targets.kd)
    torch.testing.assert_close(loss.total, ref, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(loss.total, list(out.logits), retain_graph=True)
    g_ref = torch.autograd.grad(ref, list(out.logits))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_the_tolerance_tells_float32_from_float64(float64_cl_ilr):
    # The old behaviour - teachers and ramp in float32 - is ~1e-7 away, far outside 1e-12.
    model, okd, x, y = float64_cl_ilr
    logits = list(model(x).logits)
    exact = reference_cl_ilr(logits, y, 40, 300)
    rounded = reference_cl_ilr([z.float() for z in logits], y, 40, 300).double()
    assert abs(float(rounded.detach() - exact.detach())) > 1e-12 * abs(float(exact.detach())) * 100


def test_float32_and_half_logits_keep_a_float32_ramp_and_teacher():
    agg = bf.aggregators.PeerMean()
    for dtype in (torch.float32, torch.bfloat16):
        z = [torch.zeros(2, 3, dtype=dtype)] * 2
        assert agg.dtype_for(bf.BranchedOutput(z, [None] * 2, [None] * 2)) == torch.float32
