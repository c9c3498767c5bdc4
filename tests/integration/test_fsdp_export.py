"""export() of an FSDP2-sharded branched model gathers the full weights (2 gloo processes on CPU)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import branchify as bf

from conftest import TinyCifarResNet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2, join=True)
    expected = _build().export().state_dict()
    got = torch.load(out, weights_only=True)
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
