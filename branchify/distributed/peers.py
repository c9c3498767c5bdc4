"""The DML-style exchange: :class:`DistributedCohort` runs this rank's peers and all-gathers every
peer's logits (and features) each step, so the whole cohort's loss is computed on every rank while
gradient reaches only the local peers; an aggregator with parameters is replicated across ranks."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..cohort import Cohort, CohortError, check_aggregator
from ..contract import LeafModel
from ..outputs import BranchedOutput
from ..spec import INPUT, Spec
from ..utils import tensor_fingerprint
from .env import DistributedError, check_same, comm_device, gather_objects


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

    Examples:
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
        from ..aggregators import PeerAttention

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
