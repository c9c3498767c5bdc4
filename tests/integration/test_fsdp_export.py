"""export() of an FSDP2-sharded branched model gathers the full weights (2 gloo processes on CPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import branchify as bf

from conftest import TinyCifarResNet
from gloo_ranks import run_ranks


def _build() -> bf.BranchedModel:
    torch.manual_seed(0)
    model, _ = bf.method("one", TinyCifarResNet())
    return model


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        model = _build()
        for segment in model.segments.values():
            fully_shard(segment)
        fully_shard(model)
        assert type(next(model.parameters())).__name__ == "DTensor"
        student = model.export()  # every rank takes part in gathering the shards
        if rank == 0:
            torch.save(student.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_export_from_fsdp2_gathers_every_shard(tmp_path):
    out = str(tmp_path / "student.pt")
    run_ranks(_rank, (out,), nprocs=2, timeout=120, start_method="spawn")
    expected = _build().export().state_dict()
    got = torch.load(out, weights_only=True)
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
