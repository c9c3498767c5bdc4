"""Peers on several processes with ``torch.distributed``: the rank helpers every part of the
package uses (``env.py``: joining the process group, rank and main rank, means over ranks, the
checks that keep ranks consistent), a DML-style per-batch logit exchange (:class:`DistributedCohort`,
``peers.py``) and codistillation across replica groups (``codistill.py``). MD's soft-label
collective is :class:`branchify.md.CollectiveExchange`.

Launch with ``torchrun --nproc_per_node N ...`` (one machine or many); :func:`init_from_env`
joins the process group (gloo on CPU, nccl on GPU). Peers are numbered globally, rank-major:
with ``P`` peers on ``W`` ranks, rank ``r`` hosts peers ``r*P/W .. (r+1)*P/W - 1``
(:func:`assign_peers`), so ranks may hold different architectures and one process may host
several peers. Nothing here averages peer parameters: every peer is a different network that
lives on exactly one rank, so there is no DDP wrapper around peers (and hence no
``find_unused_parameters`` concern); only an aggregator's parameters are replicated, see
:class:`DistributedCohort`.

Every check gathers the values of *all* ranks and raises the same error on each of them, so a
bad launch fails everywhere with one message instead of leaving some ranks waiting forever.

Example (one peer per rank, MD)::

    rank, world = init_from_env()
    mine = assign_peers(len(MODELS), world, rank)
    cohort = Cohort([build(MODELS[i]) for i in mine])
    trainer = MDTrainer(cohort, opts, loader, soft_label_loader=..., peer_ids=mine,
                        exchange=CollectiveExchange(num_peers=len(MODELS)))
"""
from .env import (
    DistributedError,
    RankFailed,
    assign_peers,
    barrier,
    broadcast,
    check_same,
    comm_device,
    gather_objects,
    init_from_env,
    is_distributed,
    is_main,
    launched_by_torchrun,
    mean_over_ranks,
    on_main,
    rank_world,
    shutdown,
)
from .peers import DistributedCohort

__all__ = ["DistributedCohort", "DistributedError", "RankFailed", "assign_peers", "barrier", "broadcast", "check_same",
           "comm_device", "gather_objects", "init_from_env", "is_distributed", "is_main", "launched_by_torchrun",
           "mean_over_ranks", "on_main", "rank_world", "shutdown"]

_MOVED_TO_MD = ("Aggregate", "CollectiveExchange", "LocalExchange")


def __getattr__(name: str):
    """MD's soft-label exchange lives in :mod:`branchify.md`; its old names here still resolve.

    Examples:
        >>> from branchify.distributed import LocalExchange   # same class as branchify.md.LocalExchange
    """
    if name in _MOVED_TO_MD:
        from .. import md

        return getattr(md, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
