"""Codistillation pieces without launching a run: the loss against a hand computation, top-k
packing, the teacher set of the file transport (wait, staleness, drop, rejoin, finished peers),
options, and config checks that fail on every one of 4 gloo ranks (a 2 x 2 DeviceMesh) with one
message."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_ranks
from torch import nn

from branchify.distributed.codistill import (
    CodistillError,
    CodistillOptions,
    CodistillPeer,
    config_mismatch,
    payload_bytes,
    topk_pack,
    topk_unpack,
)
from branchify.distributed.codistill_transport import FileTransport, LocalTransport


def _peers(options: CodistillOptions, seed: int = 0) -> list[CodistillPeer]:
    torch.manual_seed(seed)
    nets = [nn.Linear(5, 4).double() for _ in range(options.groups)]
    return [CodistillPeer(n, g, options, lambda h: nn.Linear(5, 4).double()) for g, n in enumerate(nets)]


@pytest.mark.parametrize("aggregator", ["pairwise", "peer_mean", "mean"])
def test_weights_mode_loss_is_ce_plus_the_aggregators_kd_on_the_frozen_copies(aggregator):
    opts = CodistillOptions(groups=3, temperature=2.0, kd_weight=0.5, aggregator=aggregator)
    peers = _peers(opts)
    hub = LocalTransport(3)
    for g, p in enumerate(peers):
        hub.channel(g).publish(0, p.snapshot())
    for g, p in enumerate(peers):
        p.absorb(hub.channel(g).collect(0))
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    z = peers[0].model(x)
    loss, parts = peers[0].loss(z, y, x)
    t = [peers[g].model(x).detach() for g in (1, 2)]

    def kl(teacher):  # T^2 KL(softmax(teacher/T) || softmax(z/T)), batchmean
        p = F.softmax(teacher / 2.0, -1)
        return 4.0 * (p * (p.log() - F.log_softmax(z / 2.0, -1))).sum(-1).mean()

    kd = {"pairwise": (kl(t[0]) + kl(t[1])) / 2, "peer_mean": kl((t[0] + t[1]) / 2),
          "mean": kl((z.detach() + t[0] + t[1]) / 3)}[aggregator]
    torch.testing.assert_close(loss, F.cross_entropy(z, y) + 0.5 * kd)
    assert parts["teachers"] == 2 and peers[0].live == [1, 2]
    loss.backward()  # gradient reaches only this group's model, never a frozen copy
    assert all(q.grad is None for q in peers[0].teachers[1].parameters())


def test_topk_round_trip_keeps_the_senders_probabilities_on_the_sent_classes():
    z = torch.randn(7, 10)
    full = topk_unpack(topk_pack(z, None), 10)
    torch.testing.assert_close(full, z)
    approx = topk_unpack(topk_pack(z, 3), 10).softmax(-1)
    top = z.topk(3, -1).indices
    torch.testing.assert_close(approx.gather(-1, top), z.softmax(-1).gather(-1, top))
    torch.testing.assert_close(approx.sum(-1), torch.ones(7))
    assert payload_bytes(topk_pack(z, 3)) == 7 * 3 * 4 + 7 * 3 * 8 + 7 * 4


def test_logits_mode_distils_on_the_shared_micro_batch_from_the_peers_top_k():
    opts = CodistillOptions(groups=2, exchange="logits", topk=None)
    peers = _peers(opts)
    shared = torch.randn(4, 5, dtype=torch.float64)
    snaps = {g: p.snapshot(p.model(shared), shared) for g, p in enumerate(peers)}
    peers[0].absorb({1: snaps[1]})
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    zs = peers[0].model(shared)
    loss, _ = peers[0].loss(peers[0].model(x), y, shared, zs)
    t = peers[1].model(shared).detach().float().double()
    kd = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss, F.cross_entropy(peers[0].model(x), y) + kd)


def _snap(path: Path, group: int, step: int, fp: str = "f", final: bool = False) -> None:
    torch.save({"step": step, "final": final, "fingerprint": fp, "payload": {"weights": {"w": torch.ones(2)}}},
               path / f"g{group}r0-{step}.pt")


def test_file_transport_teacher_set_follows_staleness(tmp_path):
    lines: list[str] = []
    opts = CodistillOptions(groups=3, exchange_every=10, max_stale=1, wait_s=0.2)
    t = FileTransport(tmp_path, 0, opts, fingerprint="f", on_event=lines.append)
    _snap(tmp_path, 1, 20), _snap(tmp_path, 2, 10)
    assert sorted(t.collect(20)) == [1, 2]  # group 2 lags one exchange (allowed: max_stale=1)
    got = t.collect(40)                      # 1 is 2 exchanges behind, 2 is 3: both leave
    assert got == {} and t.dropped == {1, 2}
    assert "teacher set shrinks to [] at step 40: group 1 is 2 exchanges behind" in lines[-2]
    assert "group 2 is 3 exchanges behind (last snapshot at step 10; the limit is 1)" in lines[-1]
    _snap(tmp_path, 2, 50, final=True)       # a finished peer: its final weights teach at once
    _snap(tmp_path, 1, 50)
    assert sorted(t.collect(50)) == [1, 2] and "(re)joins" in lines[-1]
    (tmp_path / "g1r0-99.pt").write_bytes(b"")  # another writer's torn file is never read as a snapshot
    _snap(tmp_path, 2, 60, fp="other")
    with pytest.raises(CodistillError, match="different config"):
        t.collect(60)


def test_options_are_checked():
    with pytest.raises(CodistillError, match="groups must be an int >= 2"):
        CodistillOptions(groups=1)
    with pytest.raises(CodistillError, match="exchange_every=10 with exchange='logits'"):
        CodistillOptions(groups=2, exchange="logits", exchange_every=10)
    with pytest.raises(CodistillError, match="aggregator must be one of"):
        CodistillOptions(groups=2, aggregator="gate")


def _mismatch_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from branchify.distributed.codistill import check_configs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("group", "dp"))
    assert torch.distributed.get_world_size(mesh["dp"].get_group()) == 2
    try:
        check_configs({"lr": 0.1, "model": "resnet20" if rank != 3 else "vgg16"})
        message = "no error"
    except CodistillError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)
    torch.distributed.destroy_process_group()


def test_mismatched_configs_fail_on_every_rank_of_a_2x2_mesh_with_the_same_message(tmp_path):
    run_ranks(_mismatch_worker, (str(tmp_path),), nprocs=4, timeout=60)
    messages = {Path(tmp_path, f"rank{r}.txt").read_text() for r in range(4)}
    assert len(messages) == 1
    assert "rank 3 differs from rank 0: model: 'resnet20' (rank 0) vs 'vgg16' (rank 3)" in messages.pop()
    assert config_mismatch([{"a": 1}, {"a": 1}]) is None


def test_groups_may_hold_different_architectures_only_logits_cross():
    opts = CodistillOptions(groups=2)
    archs = [lambda: nn.Linear(5, 4), lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))]
    torch.manual_seed(1)
    nets = [a() for a in archs]
    peers = [CodistillPeer(n, g, opts, lambda h: archs[h]()) for g, n in enumerate(nets)]
    for g, p in enumerate(peers):
        p.absorb({1 - g: peers[1 - g].snapshot()})
    x = torch.randn(4, 5)
    assert isinstance(peers[0].teachers[1], nn.Sequential) and isinstance(peers[1].teachers[0], nn.Linear)
    torch.testing.assert_close(peers[0].teacher_logits(x, 4)[0], nets[1](x).detach())
    with pytest.raises(CodistillError, match="group 1's weights do not fit the Sequential group 0 built"):
        peers[0].absorb({1: peers[0].snapshot()})


def test_logits_for_other_images_than_the_shared_batch_are_refused():
    peers = _peers(CodistillOptions(groups=2, exchange="logits"))
    shared = torch.randn(4, 5, dtype=torch.float64)
    peers[0].absorb({1: peers[1].snapshot(peers[1].model(shared), shared)})
    other = shared.flip(0)
    with pytest.raises(CodistillError, match="group 1's logits are for other images"):
        peers[0].loss(peers[0].model(other), torch.zeros(4, dtype=torch.long), other, peers[0].model(other))


def test_file_transport_in_logits_mode_uses_only_the_same_steps_logits(tmp_path):
    lines: list[str] = []
    opts = CodistillOptions(groups=2, exchange="logits", wait_s=0.1)
    t = FileTransport(tmp_path, 0, opts, fingerprint="f", on_event=lines.append)
    _snap(tmp_path, 1, 5)
    assert list(t.collect(5)) == [1]
    _snap(tmp_path, 1, 7)
    assert t.collect(6) == {} and "group 1 is ahead (logits for step 7" in lines[-1]
    assert t.collect(4) == {}  # older logits are for other images too
