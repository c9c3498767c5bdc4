"""MD's soft-label exchange: :class:`LocalExchange` combines the soft labels of peers in one process,
:class:`CollectiveExchange` all-reduces the accuracy-weighted sum across ranks after checking that
the ranks agree on peers, classes and training set; both return an :class:`Aggregate`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..aggregators.accuracy_weighted import accuracy_weights
from ..cohort import CohortError
from ..distributed.env import DistributedError, check_same, comm_device, gather_objects
from .soft_labels import weighted_sum


# ---------------------------------------------------------------------- MD soft-label exchange
@dataclass
class Aggregate:
    """The result of combining soft labels over all peers.

    Attributes:
        soft_labels: ``S_e = sum_i a_i S_i``, ``[N, C]``.
        weights: ``a_i`` for every peer, in global peer order.
        accuracies: ``v_i`` for every peer, in global peer order.
    """

    soft_labels: torch.Tensor
    weights: list[float]
    accuracies: list[float]


class LocalExchange:
    """Combines soft labels of peers that all live in this process (single-process MD).

    Examples:
        >>> agg = LocalExchange().combine([0, 1], [torch.ones(2, 2), torch.zeros(2, 2)], [30.0, 10.0], 0)
        >>> agg.weights
        [0.75, 0.25]
    """

    rank = 0
    world_size = 1

    def __init__(self, num_peers: int | None = None) -> None:
        self.num_peers = num_peers

    def combine(self, peer_ids: Sequence[int], probs: Sequence[torch.Tensor], accuracies: Sequence[float],
                labels_checksum: int) -> Aggregate:
        """``S_e`` from this process's peers (``peer_ids`` give their global order)."""
        ids = list(peer_ids)
        _check_partition([ids], self.num_peers)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        acc = [float(accuracies[j]) for j in order]
        w = accuracy_weights(acc)
        return Aggregate(weighted_sum([probs[j] for j in order], w), w, acc)

    def gather(self, obj: Any) -> list[Any]:
        """``[obj]``: the single process's value."""
        return [obj]

    def check_same(self, value: Any, what: str, fix: str) -> list[Any]:
        """Nothing to compare in one process."""
        return [value]


class CollectiveExchange(LocalExchange):
    """Combines soft labels across ranks: ``all_reduce(sum_{local i} a_i S_i)``.

    Each rank contributes its local peers' weighted soft labels; the weights need every peer's
    accuracy, gathered first together with the peers' ids, class counts, sample counts and a
    checksum of the labels in index order - so peers with different classes, ranks with
    different data, or a world size that does not fit the peer count fail with a clear error
    on every rank before any tensor collective.

    Args:
        num_peers: the total number of peers the run expects (checked against the ranks).
        group: the process group (default: the world).

    Examples:
        >>> ex = CollectiveExchange(num_peers=3)       # under torchrun, after init_from_env()   # doctest: +SKIP
        >>> agg = ex.combine([rank], [S_local], [acc_local], checksum)                          # doctest: +SKIP
    """

    def __init__(self, num_peers: int | None = None, group: Any = None) -> None:
        super().__init__(num_peers)
        if not dist.is_initialized():
            raise DistributedError("CollectiveExchange needs an initialised process group: call "
                                   "branchify.distributed.init_from_env() under torchrun first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def combine(self, peer_ids: Sequence[int], probs: Sequence[torch.Tensor], accuracies: Sequence[float],
                labels_checksum: int) -> Aggregate:
        info = {"ids": [int(i) for i in peer_ids], "acc": [float(a) for a in accuracies],
                "shapes": [tuple(p.shape) for p in probs], "checksum": int(labels_checksum)}
        infos = gather_objects(info, self.group)
        _check_partition([i["ids"] for i in infos], self.num_peers)
        shapes = {pid: s for i in infos for pid, s in zip(i["ids"], i["shapes"])}
        if len({s[1] for s in shapes.values()}) > 1:
            listing = ", ".join(f"peer {pid}: {s[1]} classes" for pid, s in sorted(shapes.items()))
            raise CohortError(f"the peers predict different numbers of classes ({listing}); every peer must be "
                              f"built with the same num_classes")
        if len({s[0] for s in shapes.values()}) > 1 or len({i["checksum"] for i in infos}) > 1:
            listing = ", ".join(f"rank {r}: {i['shapes'][0][0] if i['shapes'] else '?'} samples, labels checksum "
                                f"{i['checksum']}" for r, i in enumerate(infos))
            raise DistributedError(f"ranks hold different training sets ({listing}); soft labels are indexed by "
                                   f"sample index, so every rank must load the same samples in the same index order "
                                   f"(same data files, train subset and seed)")
        acc_of = {pid: a for i in infos for pid, a in zip(i["ids"], i["acc"])}
        ids = sorted(acc_of)
        acc = [acc_of[pid] for pid in ids]
        w = accuracy_weights(acc)
        mine = sorted(range(len(peer_ids)), key=list(peer_ids).__getitem__)
        local = weighted_sum([probs[j] for j in mine], [w[ids.index(peer_ids[j])] for j in mine])
        buf = local.to(comm_device(self.group))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return Aggregate(buf.to(local.device), w, acc)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        return gather_objects(obj, self.group)

    def check_same(self, value: Any, what: str, fix: str) -> list[Any]:
        """Raise on every rank unless all ranks hold an equal ``value``."""
        return check_same(value, what, fix, self.group)


def _check_partition(id_lists: Sequence[Sequence[int]], num_peers: int | None) -> None:
    """The ranks' peer ids must be exactly 0..P-1, each once (P = ``num_peers`` when given)."""
    flat = [i for ids in id_lists for i in ids]
    total = num_peers if num_peers is not None else len(flat)
    if sorted(flat) != list(range(total)):
        per_rank = ", ".join(f"rank {r}: {list(ids)}" for r, ids in enumerate(id_lists))
        raise DistributedError(
            f"the ranks host peers {per_rank}, but a cohort of {total} peers needs ids 0..{total - 1}, each on exactly "
            f"one rank; with world size {len(id_lists)} use peer_ids=assign_peers({total}, {len(id_lists)}, rank) "
            f"or launch with --nproc_per_node matching the number of peers")
