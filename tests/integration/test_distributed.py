"""torch.distributed: 2 gloo ranks (one peer each, different architectures) give the same MD soft
labels and the same DML updates as one process hosting both peers; per-rank checkpoints resume;
bad launches fail on every rank with a clear error."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.aggregators import Pairwise, PeerAttention
from branchify.distributed import DistributedError, assign_peers, check_same, gather_objects
from branchify.md import LocalExchange, MDTrainer
from branchify.utils import tensor_fingerprint
from branchify.schedules import IntervalSchedule
from branchify.recipes.data import TensorLoader

from gloo_ranks import run_ranks
from peer_models import SmallCNN, SmallMLP, step_all

WORLD, N, BATCH, T = 2, 40, 10, 3.0


def build_peer(i: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(100 + i)  # the same init whichever process builds peer i
    return SmallCNN(classes, width=5) if i == 0 else SmallMLP(classes)


def data(flip_labels: bool = False):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127).long() + 2 * (images[:, 0, 0].float().mean(1) > 127).long()
    return images, (3 - labels if flip_labels else labels)


def loaders(seed: int = 0, flip_labels: bool = False, with_index: bool = True):
    images, labels = data(flip_labels)
    train = TensorLoader(images, labels, BATCH, mean=(0.5,), std=(0.25,), shuffle=True, seed=seed, augment=True,
                         crop_padding=1, with_index=with_index)
    plain = TensorLoader(images, labels, 16, mean=(0.5,), std=(0.25,), with_index=True)
    return train, plain


def md_trainer(peer_ids, exchange, *, seed=0, flip_labels=False, schedule=IntervalSchedule(1, 2), ckpt=None):
    cohort = bf.Cohort([build_peer(i) for i in peer_ids])
    opts = [torch.optim.SGD(cohort.peer_parameters(j), lr=0.1, momentum=0.9) for j in range(len(peer_ids))]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]
    train, plain = loaders(seed, flip_labels)
    return MDTrainer(cohort, opts, train, soft_label_loader=plain, schedule=schedule, temperature=T,
                     lr_schedulers=scheds, peer_ids=peer_ids, exchange=exchange, checkpoint_dir=ckpt)


def run_md(trainer: MDTrainer, epochs: int = 5) -> list[torch.Tensor]:
    teachers: list[torch.Tensor] = []

    def keep(rec):
        if rec["r"] == 0:
            teachers.append(trainer.teacher.clone())

    trainer.fit(epochs, callback=keep)
    return teachers


def _fill(tensors, seed: int) -> None:
    """Deterministic values, the same in every process (projections, attention weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def run_dml(model, peers, steps: int = 3, aggregator=None) -> list[float]:
    okd = bf.OnlineKD(model, aggregator if aggregator is not None else Pairwise(), temperature=2.0)
    opts = [torch.optim.SGD(p.parameters(), lr=0.1) for p in peers]
    if aggregator is not None:
        _fill(aggregator.parameters(), 99)
        opts.append(torch.optim.SGD(aggregator.parameters(), lr=0.1))
    train, _ = loaders(with_index=False)
    torch.manual_seed(7)  # dropout masks: the CNN draws none, so the MLP's come from this seed everywhere
    losses = []
    for step, (x, y) in zip(range(steps), train):
        loss = okd(model(x), y)
        losses.append(step_all(loss.total, opts))
    return losses


def _errors(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects the message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from branchify.distributed import DistributedCohort, init_from_env
    from branchify.md import CollectiveExchange

    init_from_env(backend="gloo", timeout_s=60)
    out_dir = Path(out)
    res: dict = {}
    mine = assign_peers(WORLD, WORLD, rank)
    trainer = md_trainer(mine, CollectiveExchange(num_peers=WORLD), ckpt=out_dir / "ckpt")
    res["teachers"] = run_md(trainer)
    res["weights"] = [c["weights"] for c in trainer.cycles]
    res["state"] = trainer.peers[0].state_dict()
    again = md_trainer(mine, CollectiveExchange(num_peers=WORLD), ckpt=out_dir / "ckpt")
    again.fit(5)
    res["resumed_from"] = again.resumed_from
    res["resumed_teacher_equal"] = torch.equal(again.teacher, trainer.teacher)
    uneven = md_trainer(mine, CollectiveExchange(num_peers=WORLD), ckpt=out_dir / f"only-rank0-{rank}")
    if rank == 0:  # rank 0 finds its epoch-5 checkpoint, rank 1 finds none
        uneven.checkpoint_dir.mkdir()
        shutil.copy(trainer.checkpoint_path, uneven.checkpoint_path)
    res["resume_mismatch"] = _errors(lambda: uneven.fit(6))

    peer = build_peer(rank)
    dc = DistributedCohort([peer], num_peers=WORLD)
    res["dml_losses"] = run_dml(dc, [peer])
    res["dml_state"] = peer.state_dict()

    peer = build_peer(rank)  # OKDDip, network-based: features exchanged, projected to one width
    local = bf.Cohort([peer], project_features=8)
    _fill(local.projections.parameters(), 50 + rank)
    okddip = DistributedCohort(local, num_peers=WORLD, gather_features=True)
    res["okddip_losses"] = run_dml(okddip, [peer, local.projections], aggregator=PeerAttention(leader=None))
    res["okddip_state"] = {**peer.state_dict(), **okddip.aggregator.state_dict()}

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res["batch_mismatch"] = _errors(lambda: dc(x + rank))
    res["class_mismatch"] = _errors(lambda: DistributedCohort([build_peer(rank, classes=4 + rank)]))
    res["world_mismatch"] = _errors(lambda: DistributedCohort([build_peer(rank)], num_peers=3))
    res["exchange_mismatch"] = _errors(lambda: md_trainer(mine, CollectiveExchange(num_peers=3),
                                                          schedule=IntervalSchedule(0, 1)).fit(1))
    res["order_mismatch"] = _errors(lambda: md_trainer(mine, CollectiveExchange(), seed=rank).fit(1))
    res["data_mismatch"] = _errors(lambda: md_trainer(mine, CollectiveExchange(), flip_labels=rank == 1,
                                                      schedule=IntervalSchedule(0, 1)).fit(1))
    torch.save(res, out_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-rank job once; every test below reads its results."""
    out = tmp_path_factory.mktemp("ranks")
    # Forked ranks inherit the imported modules (seconds per rank saved on a busy 2-core machine);
    # building an optimiser once imports torch._dynamo here rather than in every rank. The ranks
    # use one thread each, so no OpenMP pool is touched after the fork. Spawn where fork is unsafe.
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    run_ranks(_worker, (str(out),), nprocs=WORLD, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The same peers hosted by one process (LocalExchange, plain Cohort)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = md_trainer([0, 1], LocalExchange(num_peers=2))
        teachers = run_md(trainer)
        peers = [build_peer(0), build_peer(1)]
        losses = run_dml(bf.Cohort(peers), peers)
        okddip_peers = [build_peer(0), build_peer(1)]
        cohort = bf.Cohort(okddip_peers, project_features=8)
        for g, proj in enumerate(cohort.projections):
            _fill(proj.parameters(), 50 + g)
        okddip_losses = run_dml(cohort, [*okddip_peers, cohort.projections], aggregator=PeerAttention(leader=None))
    finally:
        torch.set_num_threads(before)
    return {"teachers": teachers, "weights": [c["weights"] for c in trainer.cycles],
            "states": [p.state_dict() for p in trainer.peers], "dml_losses": losses,
            "dml_states": [p.state_dict() for p in peers], "okddip_losses": okddip_losses,
            "okddip_states": [{**p.state_dict(), **cohort.aggregator.state_dict()} for p in okddip_peers]}


def test_two_ranks_give_the_single_process_soft_labels(ranks, single):
    assert len(single["teachers"]) == 2  # epochs 1 and 4 start cycles 0 and 1's distillation
    for r in range(WORLD):
        assert len(ranks[r]["teachers"]) == 2
        for got, want in zip(ranks[r]["teachers"], single["teachers"]):
            assert (got - want).abs().max() <= 1e-6
        assert ranks[r]["weights"] == single["weights"]
        for k, v in single["states"][r].items():  # each rank's peer trained exactly like in one process
            assert torch.allclose(ranks[r]["state"][k].float(), v.float(), atol=1e-5), k


def test_two_ranks_dml_exchange_matches_the_single_process_cohort(ranks, single):
    for r in range(WORLD):
        assert ranks[r]["dml_losses"] == pytest.approx(single["dml_losses"], abs=1e-5)
        for k, v in single["dml_states"][r].items():
            assert torch.allclose(ranks[r]["dml_state"][k].float(), v.float(), atol=1e-6), k


def test_two_ranks_okddip_with_exchanged_features_matches_the_single_process_cohort(ranks, single):
    for r in range(WORLD):
        assert ranks[r]["okddip_losses"] == pytest.approx(single["okddip_losses"], abs=1e-5)
        for k, v in single["okddip_states"][r].items():  # the local peer and the replicated attention
            assert torch.allclose(ranks[r]["okddip_state"][k].float(), v.float(), atol=1e-5), k


def test_per_rank_checkpoints_resume(ranks):
    for r in range(WORLD):
        assert ranks[r]["resumed_from"] == 5 and ranks[r]["resumed_teacher_equal"]
        assert ranks[r]["resume_mismatch"].startswith(
            "DistributedError: ranks disagree on the epoch to start from (rank 0: 5, rank 1: 0)")


def test_bad_launches_fail_on_every_rank(ranks):
    for r in range(WORLD):
        res = ranks[r]
        assert "input batch of step 3" in res["batch_mismatch"] and "DistributedSampler" in res["batch_mismatch"]
        assert res["class_mismatch"].startswith("CohortError") and "peer 0 (SmallCNN@rank0): 4 classes, peer 1 " \
                                                                   "(SmallMLP@rank1): 5 classes" in res["class_mismatch"]
        assert "world size 2 with [1, 1] peers per rank gives 2 peers, but the cohort has 3" in res["world_mismatch"]
        assert "a cohort of 3 peers needs ids 0..2" in res["exchange_mismatch"]
        assert "training samples of epoch 0" in res["order_mismatch"] and "same data, seed" in res["order_mismatch"]
        assert "ranks hold different training sets" in res["data_mismatch"]


def test_world_size_must_fit_the_peer_count():
    assert assign_peers(6, 3, 2) == [4, 5]
    with pytest.raises(DistributedError, match=r"world size 2 does not match the cohort's 3 peers.*"
                                               r"--nproc_per_node 3"):
        assign_peers(3, 2, 0)


def test_single_process_helpers():
    assert gather_objects(3) == [3] and check_same("a", "x", "y") == ["a"]
    x = torch.randn(3, 2)
    assert int(tensor_fingerprint(x)) == int(tensor_fingerprint(x.clone()))
    assert int(tensor_fingerprint(x)) != int(tensor_fingerprint(x.t().contiguous()))
    assert int(tensor_fingerprint(x.half())) == int(tensor_fingerprint(x.half().clone()))
