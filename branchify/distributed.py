"""Peers on several processes with ``torch.distributed``: the MD soft-label collective, a DML-style
per-batch logit exchange, and the checks that keep ranks consistent.

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
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from branchify.cohort import Cohort, CohortError, check_aggregator
from branchify.contract import LeafModel
from branchify.outputs import BranchedOutput
from branchify.soft_labels import accuracy_weights, sequence_checksum, weighted_sum
from branchify.spec import INPUT, Spec

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Ranks that disagree (peer count, classes, data, resume epoch) or a bad launch."""


# ---------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ...) are set."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group torchrun set up; returns ``(rank, world_size)``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each rank then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. Already initialised: returns the current group's.

    Example:
        >>> rank, world = init_from_env()          # under torchrun --nproc_per_node 2   # doctest: +SKIP
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedError(f"not launched by torchrun: {missing} are not set. Start the script with "
                               f"'torchrun --nproc_per_node N -m <module> ...' (or set them yourself)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def comm_device(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assign_peers(num_peers: int, world_size: int, rank: int) -> list[int]:
    """Global indices of the peers rank ``rank`` hosts (contiguous, rank-major).

    ``world_size`` must divide ``num_peers``: every rank hosts the same number of peers.

    Example:
        >>> assign_peers(4, 2, 1)
        [2, 3]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is outside world size {world_size}")
    if num_peers < 1 or num_peers % world_size:
        hint = (f"run torchrun --nproc_per_node {num_peers} (one peer per rank)" if num_peers >= 1 else
                "give at least one peer")
        divisors = [d for d in range(1, num_peers + 1) if num_peers % d == 0]
        raise DistributedError(f"world size {world_size} does not match the cohort's {num_peers} peers: every rank "
                               f"must host the same number of peers, so the world size must divide {num_peers} "
                               f"(one of {divisors}); {hint}")
    per = num_peers // world_size
    return list(range(rank * per, (rank + 1) * per))


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group).

    Example:
        >>> gather_objects({"peers": [0]})
        [{'peers': [0]}]
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_same(value: Any, what: str, fix: str, group: Any = None) -> list[Any]:
    """Raise :class:`DistributedError` on every rank unless all ranks hold an equal ``value``.

    Example:
        >>> check_same(5, "resume epoch", "resume every rank from the same checkpoint")
        [5]
    """
    values = gather_objects(value, group)
    if any(v != values[0] for v in values):
        listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"ranks disagree on the {what} ({listing}); {fix}")
    return values


def tensor_fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
    """A bitwise, order-sensitive int64 checksum of tensors of any dtype (no device sync).

    Floats are hashed by their bit patterns, so equal batches (same samples, same
    augmentation) give equal fingerprints on every rank and anything else almost surely not.

    Example:
        >>> x = torch.randn(4, 3)
        >>> int(tensor_fingerprint(x)) == int(tensor_fingerprint(x.clone()))
        True
        >>> int(tensor_fingerprint(x)) == int(tensor_fingerprint(x + 1))
        False
    """
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    parts = []
    for t in tensors:
        t = t.detach().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.is_floating_point() or t.is_complex():  # hash the bit patterns, exactly
            t = t.reshape(-1).view(as_int.get(t.element_size(), torch.uint8))
        parts.append(t.reshape(-1))
        parts.append(torch.tensor(list(t.shape) or [0], device=t.device))
    return sequence_checksum(*parts)


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

    Example:
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

    Example:
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


# ---------------------------------------------------------------------- DML-style exchange
class DistributedCohort(LeafModel):
    """A cohort spread over ranks: local peers run here, the others' logits arrive by all_gather.

    For network-level peers trained on *identical batches* (DML, network-based OKDDip): every
    step each rank runs its local peers, all ranks all_gather the logits (and, with
    ``gather_features``, the penultimate features), and ``forward`` returns a
    :class:`~branchify.outputs.BranchedOutput` with **all** peers in global order. Local entries
    keep their graph; remote entries are detached copies, so ``OnlineKD`` over this module
    computes the whole cohort's loss on every rank while gradient reaches only the local peers
    (exactly their gradient in the single-process cohort).

    The batch must be the same on every rank: before each exchange the ranks compare a bitwise
    fingerprint of the inputs (``check_every`` steps; 0 disables) and fail with a clear error
    if they differ - seed every rank's loader the same way and do not shard the data with a
    ``DistributedSampler``.

    An aggregator with parameters (PeerAttention) is replicated on every rank: it is broadcast
    from rank 0 when attached, and since every rank evaluates the same full loss its gradient is
    the same everywhere; :meth:`average_shared_gradients` all-reduces it to remove any
    floating-point drift (call it before ``optimizer.step()``).

    Args:
        local: this rank's peers (a :class:`~branchify.cohort.Cohort` or a list of networks).
        num_peers: the total the run expects (checked against the world).
        target: the deployed peer (global index).
        gather_features: also exchange features (needed by PeerAttention; widths must agree
            or the local Cohort must project them).
        check_every: compare input fingerprints every this many forwards (0 = never).
        group: the process group (default: the world).

    Example:
        >>> dc = DistributedCohort([build_peer(rank)], num_peers=world)           # doctest: +SKIP
        >>> okd = OnlineKD(dc, Pairwise(), temperature=1.0)                       # doctest: +SKIP
        >>> loss = okd(dc(x), y); loss.total.backward(); opt.step()                # doctest: +SKIP
    """

    def __init__(self, local: Cohort | Sequence[nn.Module], *, num_peers: int | None = None, target: int = 0,
                 gather_features: bool = False, check_every: int = 1, group: Any = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise DistributedError("DistributedCohort needs an initialised process group: call "
                                   "branchify.distributed.init_from_env() under torchrun first")
        self.local = local if isinstance(local, Cohort) else Cohort(list(local))
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.gather_features = bool(gather_features)
        self.check_every = int(check_every)
        infos = gather_objects({"n": self.local.num_peers, "names": self.local.names,
                                "classes": self.local.head_classes,
                                "dims": [self.local.feature_dim if self.local.projections is not None else d
                                         for d in self.local.feature_dims]}, group)
        counts = [i["n"] for i in infos]
        total = sum(counts)
        if num_peers is not None and total != num_peers:
            raise DistributedError(f"world size {self.world_size} with {counts} peers per rank gives {total} peers, "
                                   f"but the cohort has {num_peers}; launch with --nproc_per_node so that every "
                                   f"rank hosts num_peers / world_size peers (branchify.distributed.assign_peers)")
        if len(set(counts)) > 1:
            raise DistributedError(f"ranks host different numbers of peers ({counts}); every rank must host the same "
                                   f"number (branchify.distributed.assign_peers)")
        self.per_rank = counts[0]
        self.names = [f"{n}@rank{r}" for r, i in enumerate(infos) for n in i["names"]]
        self.global_feature_dims = [d for i in infos for d in i["dims"]]
        classes = [c for i in infos for c in i["classes"]]
        known = {c for c in classes if c is not None}
        if len(known) > 1:
            listing = ", ".join(f"peer {g} ({n}): {c} classes" for g, (n, c) in enumerate(zip(self.names, classes)))
            raise CohortError(f"the peers predict different numbers of classes ({listing}); every peer must be built "
                              f"with the same num_classes")
        self.local_ids = list(range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank))
        if not 0 <= target < total:
            raise CohortError(f"target={target} is not a peer index (0..{total - 1})")
        self.spec = Spec(splits=[INPUT], fanout=[total], target=target)
        self.leaf_paths = self.spec.leaf_paths()
        self._calls = 0

    @property
    def feature_dim(self) -> int | None:
        """The peers' common feature width (over all ranks), else ``None``."""
        dims = set(self.global_feature_dims)
        return dims.pop() if len(dims) == 1 and None not in dims else None

    def check_aggregator(self, aggregator: nn.Module) -> None:
        """Reject aggregators the peers cannot feed (:func:`~branchify.cohort.check_aggregator`), and
        PeerAttention without exchanged features."""
        check_aggregator(aggregator, self.names, self.global_feature_dims, projected=False,
                         where="a local Cohort(peers, project_features=<width>) on every rank")
        from branchify.aggregators import PeerAttention

        if isinstance(aggregator, PeerAttention) and not self.gather_features:
            raise CohortError(f"{type(aggregator).__name__} reads the peers' features; build the DistributedCohort "
                              f"with gather_features=True so remote peers' features are exchanged too")

    def attach(self, aggregator):
        """Attach as :meth:`LeafModel.attach` does, then give every rank rank 0's aggregator weights."""
        aggregator = super().attach(aggregator)
        if aggregator is not None:
            for t in (*aggregator.parameters(), *aggregator.buffers()):
                buf = t.detach().to(comm_device(self.group))
                src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
                dist.broadcast(buf, src=src, group=self.group)
                t.data.copy_(buf.to(t.device))
        return aggregator

    def shared_parameters(self):
        """The replicated aggregator's parameters (empty without one)."""
        return self.aggregator.parameters() if self.aggregator is not None else iter(())

    def peer_parameters(self, i: int):
        """Parameters of global peer ``i`` (must be hosted on this rank)."""
        if i not in self.local_ids:
            raise IndexError(f"peer {i} lives on rank {i // self.per_rank}; this rank ({self.rank}) hosts "
                             f"{self.local_ids}")
        return self.local.peer_parameters(i - self.local_ids[0])

    @torch.no_grad()
    def average_shared_gradients(self) -> None:
        """All-reduce (average) the aggregator's gradients so its replicas stay bit-identical."""
        for p in self.shared_parameters():
            if p.grad is not None:
                buf = p.grad.to(comm_device(self.group))
                dist.all_reduce(buf, group=self.group)
                p.grad.copy_(buf.div_(self.world_size).to(p.grad.device))

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        fp = int(tensor_fingerprint(*tensors)) if tensors else 0
        shapes = [tuple(t.shape) for t in tensors]
        check_same((fp, shapes), f"input batch of step {self._calls} (fingerprint, shapes)",
                   "every rank must train on identical batches: build each rank's loader with the same data, "
                   "seed and batch size, and do not shard it with a DistributedSampler", self.group)

    def forward_leaves(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """Local peers' forward + all_gather of every peer's logits (and features)."""
        if self.check_every and self._calls % self.check_every == 0:
            self._check_inputs(args, kwargs)
        self._calls += 1
        out = self.local.forward_leaves(*args, **kwargs)
        logits = self._exchange(out.logits)
        if self.gather_features:
            if any(f is None for f in out.features):
                raise CohortError("gather_features=True but a local peer has no penultimate features; name its "
                                  "classifier with Cohort(..., heads=[...])")
            feats = self._exchange(out.features)  # type: ignore[arg-type]
        else:
            feats = [None] * self.num_leaves
            for j, g in enumerate(self.local_ids):
                feats[g] = out.features[j]
        return BranchedOutput(logits=logits, features=feats, feature_maps=[None] * self.num_leaves, cuts={},
                              leaf_paths=self.leaf_paths)

    def _exchange(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack([t.detach() for t in local]).to(comm_device(self.group))
        parts = [torch.empty_like(stacked) for _ in range(self.world_size)]
        dist.all_gather(parts, stacked.contiguous(), group=self.group)
        everyone = [p.to(local[0].device)[j] for p in parts for j in range(self.per_rank)]
        for j, g in enumerate(self.local_ids):
            everyone[g] = local[j]  # the live tensor: gradient flows into the local peer only
        return everyone

    def export(self, i: int | None = None) -> nn.Module:
        """Global peer ``i`` (default: the target) as itself; it must be hosted on this rank."""
        i = self.spec.target if i is None else i
        if i not in self.local_ids:
            raise IndexError(f"peer {i} lives on rank {i // self.per_rank}; export it there (this rank hosts "
                             f"{self.local_ids})")
        return self.local.export(i - self.local_ids[0])
