"""OKDPH under DDP (2 gloo processes on CPU): the hybrid built and fused back on every rank keeps the
students' weights identical across ranks, and the same optimiser steps are counted."""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

import branchify as bf

from conftest import TinyCifarResNet
from gloo_ranks import run_ranks


def _rank(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, okd = bf.method("okdph", TinyCifarResNet(), init="auto", fuse_every="1_batch")
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own data
            x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
            loss = okd(ddp(x), y).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        ddp(x)  # the third step is counted (and fused back) here
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        torch.save({"params": params, "steps": int(model.fusion.steps)}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fused_students_stay_identical_across_ranks(tmp_path):
    path = str(tmp_path / "okdph")
    run_ranks(_rank, (path,), nprocs=2, timeout=180)
    r0, r1 = (torch.load(f"{path}.{r}", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
