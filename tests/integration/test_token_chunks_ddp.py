"""Token-chunked KD under DDP (2 gloo processes on CPU): the chunked loss has no collectives of its
own, so DDP averages its gradients exactly as it averages the unchunked loss's. Each rank trains
ONE on a tiny Llama through the HF wrapper (the Trainer's path) on its own batch, with -100 labels,
once unchunked and once in chunks of 3 tokens; the all-reduced gradients must agree between the
two settings (float64) and be identical on both ranks."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gloo_ranks import run_ranks

hf = pytest.importorskip("tests.hf_tiny_models")


def _rank(rank: int, port: int, path: str) -> None:
    from branchify.aggregators.base import Aggregator
    from branchify.integrations.hf import branchify_hf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        Aggregator.compute_dtype = property(lambda self: torch.float64)  # float64 end to end (this process only)
        model = branchify_hf("one", hf.make_zoo_model("llama")).double().train()
        model.okd.set_epoch(40, 300)  # ONE's ramp strictly between 0 and 1: every KD term counts
        ddp = nn.parallel.DistributedDataParallel(model)
        batch = hf.make_zoo_batch("llama", batch=2, seq=9, seed=rank)  # each rank its own data
        batch["labels"][rank, 3] = -100
        grads = {}
        for chunk in (None, 3):
            model.okd.token_chunk = chunk
            model.zero_grad(set_to_none=True)
            ddp(**batch).loss.backward()
            grads[chunk] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_chunked_loss_under_ddp_averages_the_same_gradients(tmp_path):
    path = str(tmp_path / "grads")
    run_ranks(_rank, (path,), nprocs=2, timeout=180)
    r0, r1 = (torch.load(f"{path}.{r}", weights_only=True) for r in (0, 1))
    assert set(r0[None]) == set(r0[3]) and len(r0[None]) > 10
    for name, unchunked in r0[None].items():
        torch.testing.assert_close(r0[3][name], unchunked, rtol=1e-10, atol=1e-13, msg=name)
        assert torch.equal(r0[3][name], r1[3][name]) and torch.equal(unchunked, r1[None][name]), name
