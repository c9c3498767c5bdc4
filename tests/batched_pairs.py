"""Pairs of the same branched model in its two execution forms (loop / batched), for the tests that
compare them on CPU (tests/unit/test_batched.py) and on CUDA (tests/integration/test_cuda.py)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf
from conftest import TinyCifarResNet

ATOL = 1e-5

SPECS = {
    "one": bf.Spec(splits=["layer3"], fanout=[3]),
    "tsa": bf.Spec(splits=["layer2", "layer3"], fanout=[2, 2]),  # level 2: nested vmap, 2 x 2
    "u_tsa": bf.Spec(splits=["layer2", "layer3"], fanout=[2, [3, 1]]),  # per-parent groups + a lone replica
    "dml": bf.Spec(splits=["<input>"], fanout=[2]),
    "cl_ilr": bf.Spec(splits=["layer3"], fanout=[3], grad_scale={"layer3": 1 / 3}),
}


def _pair(spec: bf.Spec, net: nn.Module | None = None) -> tuple[bf.BranchedModel, bf.BranchedModel]:
    torch.manual_seed(0)
    loop = bf.branchify(net if net is not None else TinyCifarResNet(), spec, batched=False)
    batched = copy.deepcopy(loop)
    batched.batched = True
    return loop, batched


def _close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bf.BranchedOutput:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(x)
    loss = sum(F.cross_entropy(z, y) for z in out.logits) + sum(f.square().mean() for f in out.features)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out
