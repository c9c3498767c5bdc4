"""A temporal-mean teacher under DDP (2 gloo processes on CPU): every rank keeps the same EMA, and it
equals the EMA of the synchronised weights computed by hand."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import branchify as bf

from conftest import TinyCifarResNet
from gloo_ranks import run_ranks

DECAY, STEPS = 0.6, 4


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model, okd = bf.method("one", TinyCifarResNet(), ramp=None)
        ema = bf.TemporalMean(DECAY).attach(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        expected = {k: p.detach().clone() for k, p in model.named_parameters() if not k.startswith("aggregator.")}
        for step in range(STEPS):
            g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own data
            x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
            loss = okd(ddp(x), y).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            a = min(1 - 1 / (step + 1), DECAY)
            expected = {k: a * v + (1 - a) * model.get_parameter(k).detach() for k, v in expected.items()}
        ema.sync()
        got = {k: p.detach() for k, p in ema.model.named_parameters()}
        worst = max(float((got[k] - v).abs().max()) for k, v in expected.items())
        torch.save({"ema": got, "worst": worst, "updates": int(ema.num_updates)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_keeps_the_same_ema_of_the_synchronised_weights(tmp_path):
    out = str(tmp_path / "ema")
    run_ranks(_rank, (out,), nprocs=2, timeout=180)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["updates"] == r1["updates"] == STEPS
    assert r0["worst"] < 1e-6 and r1["worst"] < 1e-6
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
