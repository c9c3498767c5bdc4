"""Codistillation (Anil et al., ICLR 2018): groups of ranks train their own model and distil
from each other's predictions, with no gradient synchronisation across groups.

``G`` groups of ``D`` ranks each: inside a group the ranks are data parallel (DDP or FSDP2 on
the group's ``"dp"`` sub-mesh); across groups only *predictions* travel, in one of two modes:

* ``exchange="weights"``: every ``K`` steps each group publishes its weights; the others load
  them into a frozen teacher copy (eval mode, no gradient) and distil from its logits on their
  own batches until the next exchange - Anil et al.'s stale peer checkpoints. Per group and
  exchange: ``(G - 1) * |weights|`` bytes arrive.
* ``exchange="logits"``: every step each group runs its model on a *shared micro-batch* (the
  same images in every group) and publishes the top-``k`` logits per image (values, class
  indices and the full log-sum-exp); the others distil on that micro-batch. Per step:
  ``(G - 1) * B_shared * (2k + 1)`` numbers arrive.

The loss of a group with live teachers ``t_1..t_m`` is, for its logits ``z`` on its batch,
``CE(z, y) + kd_weight * sum_terms w * T^2 * KL(softmax(t/T) || softmax(z/T))`` where the terms
and weights ``w`` come from any branchify aggregator applied to ``[z, t_1, ..., t_m]`` (only the
terms whose *student* is ``z``; :class:`~branchify.aggregators.Pairwise` by default, giving
DML's ``w = 1/m``). Groups may hold different architectures: only logits cross.

Transports (:mod:`branchify.distributed.codistill_transport`) move the payloads:
:class:`LocalTransport` (all groups in one process), :class:`CollectiveTransport` (gloo/nccl
``all_gather_object`` on the cross-group sub-mesh of a 2-D ``DeviceMesh``) and
:class:`FileTransport` (snapshots written atomically in the run directory, read with a bounded
wait and a staleness limit: the fault-tolerant one, a dead group never blocks the others).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
    >>> opts = CodistillOptions(groups=2)
    >>> peers = [CodistillPeer(n, g, opts, lambda g: nn.Linear(4, 3)) for g, n in enumerate(nets)]
    >>> for g, p in enumerate(peers):
    ...     p.absorb({h: q.snapshot() for h, q in enumerate(peers) if h != g})
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> loss, parts = peers[0].loss(nets[0](x), y, x)
    >>> sorted(parts)
    ['ce', 'kd', 'teachers']
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import kl_div_logits
from ..outputs import BranchedOutput
from ..utils import tensor_fingerprint
from .env import DistributedError

EXCHANGES = ("weights", "logits")


class CodistillError(DistributedError):
    """A codistillation setup that cannot work: bad options, or groups that disagree."""


@dataclass
class CodistillOptions:
    """How groups codistil.

    Args:
        groups: number of groups ``G`` (>= 2).
        exchange_every: ``K``: steps between weight exchanges (``"logits"``: must be 1).
        exchange: ``"weights"`` (stale teacher copies) or ``"logits"`` (top-k on a shared batch).
        topk: classes sent per image in ``"logits"`` mode (``None`` = all: exact logits).
        shared_batch: images of the shared micro-batch per step (``"logits"`` mode).
        temperature: ``T`` of the KD terms.
        kd_weight: weight of the KD sum.
        aggregator: ``"pairwise"`` (DML), ``"peer_mean"`` or ``"mean"``.
        max_stale: exchanges a peer may lag before it leaves the teacher set (weights mode).
        wait_s: seconds to wait for a peer's snapshot before using a staler one or dropping it.
        burn_in: steps trained on labels alone before the first exchange (Anil et al.'s burn-in:
            a teacher that is still near its random init only adds noise).

    Examples:
        >>> CodistillOptions(groups=2, exchange_every=10).exchange
        'weights'
    """

    groups: int
    exchange_every: int = 1
    exchange: str = "weights"
    topk: int | None = None
    shared_batch: int = 32
    temperature: float = 1.0
    kd_weight: float = 1.0
    aggregator: str = "pairwise"
    max_stale: int = 2
    wait_s: float = 60.0
    burn_in: int = 0

    def __post_init__(self) -> None:
        def bad(what: str) -> CodistillError:
            return CodistillError(f"codistillation option {what}")

        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 2:
            raise bad(f"groups must be an int >= 2 (the number of model copies), got {self.groups!r}")
        if isinstance(self.exchange_every, bool) or not isinstance(self.exchange_every, int) \
                or self.exchange_every < 1:
            raise bad(f"exchange_every must be an int >= 1 (steps between exchanges), got {self.exchange_every!r}")
        if self.exchange not in EXCHANGES:
            raise bad(f"exchange must be one of {list(EXCHANGES)}, got {self.exchange!r}")
        if self.exchange == "logits" and self.exchange_every != 1:
            raise bad(f"exchange_every={self.exchange_every} with exchange='logits': logits of the shared "
                      f"micro-batch are exchanged every step; use exchange='weights' for stale exchanges")
        if self.topk is not None and (not isinstance(self.topk, int) or self.topk < 1):
            raise bad(f"topk must be None (all classes) or an int >= 1, got {self.topk!r}")
        if not isinstance(self.shared_batch, int) or self.shared_batch < 1:
            raise bad(f"shared_batch must be an int >= 1, got {self.shared_batch!r}")
        if not self.temperature > 0 or self.kd_weight < 0:
            raise bad(f"temperature must be > 0 and kd_weight >= 0, got {self.temperature}, {self.kd_weight}")
        if self.aggregator not in AGGREGATORS:
            raise bad(f"aggregator must be one of {sorted(AGGREGATORS)}, got {self.aggregator!r}")
        if self.max_stale < 0 or self.wait_s < 0 or not isinstance(self.burn_in, int) or self.burn_in < 0:
            raise bad(f"max_stale, wait_s and burn_in must be >= 0, got {self.max_stale}, {self.wait_s}, "
                      f"{self.burn_in!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aggregator(name: str) -> nn.Module:
    from ..methods.common import ENSEMBLE  # the presets' ensemble= names: one value, one aggregator

    return ENSEMBLE[name]()


AGGREGATORS = ("pairwise", "peer_mean", "mean")
"""The names of :data:`branchify.methods.common.ENSEMBLE` a codistillation can use (no weights, no labels)."""


def payload_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (what a transport moves).

    Examples:
        >>> payload_bytes({"w": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.float64)]})
        28
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def topk_pack(logits: torch.Tensor, k: int | None) -> dict[str, torch.Tensor]:
    """The ``k`` largest logits per row, their class indices and the row's log-sum-exp.

    Examples:
        >>> pack = topk_pack(torch.tensor([[1.0, 3.0, 2.0]]), 2)
        >>> pack["indices"].tolist(), pack["values"].tolist()
        ([[1, 2]], [[3.0, 2.0]])
    """
    z = logits.detach().float()
    k = z.shape[-1] if k is None else min(k, z.shape[-1])
    values, indices = z.topk(k, dim=-1)
    return {"values": values.cpu(), "indices": indices.cpu(), "lse": torch.logsumexp(z, -1).cpu()}


def topk_unpack(pack: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Logits rebuilt from :func:`topk_pack`: the sent classes keep their values; the others
    share the remaining probability mass ``1 - sum_topk softmax`` equally (exact when all classes
    were sent), so ``softmax`` of the result matches the sender's on the top-k classes.

    Examples:
        >>> z = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
        >>> torch.allclose(topk_unpack(topk_pack(z, 4), 4).softmax(-1), z.softmax(-1))
        True
    """
    values, indices, lse = pack["values"].float(), pack["indices"], pack["lse"].float()
    k = values.shape[-1]
    if k >= num_classes:
        return torch.empty(values.shape[:-1] + (num_classes,)).scatter_(-1, indices, values)
    kept = torch.exp(values - lse.unsqueeze(-1)).sum(-1).clamp(max=1.0)
    rest = (1.0 - kept).clamp(min=1e-12) / (num_classes - k)
    fill = lse + torch.log(rest)
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices, values)


class CodistillPeer:
    """One group's side of codistillation: its model, its frozen teacher copies, its loss.

    Args:
        model: this group's (unwrapped) model.
        group: this group's index.
        options: :class:`CodistillOptions`.
        build_teacher: ``build_teacher(g)`` builds a model with group ``g``'s architecture
            (weights mode: the frozen copy peer weights are loaded into).

    Examples:
        >>> peer = CodistillPeer(nn.Linear(4, 3), 0, CodistillOptions(groups=2), lambda g: nn.Linear(4, 3))
        >>> peer.absorb({1: CodistillPeer(nn.Linear(4, 3), 1, CodistillOptions(groups=2), None).snapshot()})
        >>> peer.live, type(peer.teachers[1]).__name__
        ([1], 'Linear')
    """

    def __init__(self, model: nn.Module, group: int, options: CodistillOptions,
                 build_teacher: Callable[[int], nn.Module]) -> None:
        if not 0 <= group < options.groups:
            raise CodistillError(f"group {group} is outside 0..{options.groups - 1}")
        self.model, self.group, self.options = model, group, options
        self.build_teacher = build_teacher
        self.aggregator = _aggregator(options.aggregator)
        self.teachers: dict[int, nn.Module] = {}
        self.peer_logits: dict[int, torch.Tensor] = {}
        self.live: list[int] = []

    def snapshot(self, shared_logits: torch.Tensor | None = None,
                 shared_x: torch.Tensor | None = None) -> dict[str, Any]:
        """This group's payload: CPU copies of its weights, or the top-k of ``shared_logits`` (with a
        bitwise fingerprint of ``shared_x``, the images they are for, checked by the receivers)."""
        if self.options.exchange == "logits":
            if shared_logits is None:
                raise CodistillError("exchange='logits' publishes the logits of the shared micro-batch; pass them")
            pack = topk_pack(shared_logits, self.options.topk)
            if shared_x is not None:
                pack["inputs"] = tensor_fingerprint(shared_x).cpu().reshape(1)
            return {"logits": pack}
        state = self.model.state_dict()  # FSDP2 shards are DTensors: every rank gathers them whole
        return {"weights": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                            for k, v in state.items()}}

    def absorb(self, payloads: dict[int, dict[str, Any]]) -> None:
        """Take the peers' payloads (``{group: payload}``); the teacher set becomes their groups."""
        self.live = sorted(g for g in payloads if g != self.group)
        self.peer_logits = {}
        device = next(self.model.parameters()).device
        for g in self.live:
            p = payloads[g]
            if "weights" in p:
                if g not in self.teachers:
                    self.teachers[g] = self.build_teacher(g).to(device).eval().requires_grad_(False)
                try:
                    self.teachers[g].load_state_dict(p["weights"], strict=True)
                except RuntimeError as exc:
                    raise CodistillError(f"group {g}'s weights do not fit the {type(self.teachers[g]).__name__} group "
                                         f"{self.group} built as its teacher ({str(exc)[:300]}); every group must "
                                         f"name the same architecture per group (method_args.models)") from None
            else:
                self.peer_logits[g] = p["logits"]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
        """Every live teacher's logits for ``x`` (weights mode) or the shared batch (logits mode)."""
        if self.options.exchange == "logits":
            mine = tensor_fingerprint(x).cpu().reshape(1)
            for g in self.live:
                theirs = self.peer_logits[g].get("inputs")
                if theirs is not None and not torch.equal(theirs, mine):
                    raise CodistillError(f"group {g}'s logits are for other images than this rank's shared "
                                         f"micro-batch; every group must draw the same shared batches (same data, "
                                         f"seed and shared_batch) and each data-parallel rank must exchange with "
                                         f"the same rank of the other groups")
            return [topk_unpack(self.peer_logits[g], num_classes).to(x.device) for g in self.live]
        return [self.teachers[g](x).float() for g in self.live]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
             kd_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``CE(logits, y) + kd_weight * KD`` (module docstring); ``kd_logits``: this model's logits
        on the shared micro-batch ``x`` in logits mode (``logits``/``y`` are its own batch)."""
        ce = F.cross_entropy(logits.float(), y)
        student = logits if kd_logits is None else kd_logits
        teachers = self.teacher_logits(x, student.shape[-1]) if self.live else []
        kd = ce.new_zeros(())
        if teachers:
            out = BranchedOutput(logits=[student, *teachers], features=[None] * (1 + len(teachers)),
                                 feature_maps=[None] * (1 + len(teachers)))
            for term in self.aggregator(out).kd:
                if term.student is not student:
                    continue  # a term that trains a teacher: the teacher's own group computes it
                if term.is_mixture:
                    raise CodistillError(f"aggregator {self.options.aggregator!r} built a mixture term; "
                                         f"codistillation supports logit terms only")
                kd = kd + term.weight * kl_div_logits(term.teacher.detach(), student, self.options.temperature)
        total = ce + self.options.kd_weight * kd
        return total, {"ce": float(ce.detach()), "kd": float(kd.detach()), "teachers": float(len(teachers))}


def exchange_due(step: int, options: CodistillOptions) -> bool:
    """Whether step ``step`` (0-based, global) starts with an exchange: every ``K`` steps from
    ``burn_in`` on.

    Examples:
        >>> [exchange_due(s, CodistillOptions(groups=2, exchange_every=3)) for s in range(4)]
        [True, False, False, True]
        >>> [exchange_due(s, CodistillOptions(groups=2, exchange_every=2, burn_in=1)) for s in range(4)]
        [False, True, False, True]
    """
    return step >= options.burn_in and (step - options.burn_in) % options.exchange_every == 0


def allreduce_bytes(model: nn.Module, ranks: int) -> dict[str, float]:
    """DDP's gradient traffic per step: the gradient size and what a ring all-reduce sends per
    rank, ``2 (D - 1) / D`` times it.

    Examples:
        >>> allreduce_bytes(nn.Linear(3, 1), 2)
        {'gradient_bytes': 16, 'ring_bytes_per_rank': 16.0}
    """
    grad = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"gradient_bytes": grad, "ring_bytes_per_rank": 2 * (ranks - 1) / ranks * grad if ranks > 1 else 0.0}


def config_mismatch(configs: list[dict[str, Any]]) -> str | None:
    """The message naming every rank whose config differs from rank 0's, else ``None``.

    The text depends only on ``configs`` (all ranks' values), so every rank that computes it
    from the same gathered list raises the same error.

    Examples:
        >>> print(config_mismatch([{"lr": 0.1}, {"lr": 0.2}]))
        rank 1 differs from rank 0: lr: 0.1 (rank 0) vs 0.2 (rank 1)
    """
    lines = []
    for r, c in enumerate(configs[1:], start=1):
        keys = sorted(set(c) | set(configs[0]))
        diffs = [f"{k}: {configs[0].get(k, '<missing>')!r} (rank 0) vs {c.get(k, '<missing>')!r} (rank {r})"
                 for k in keys if c.get(k) != configs[0].get(k)]
        if diffs:
            lines.append(f"rank {r} differs from rank 0: " + "; ".join(diffs))
    return " | ".join(lines) if lines else None


def check_configs(config: dict[str, Any], group: Any = None) -> None:
    """All-gather every rank's config and raise the same :class:`CodistillError` on every rank if
    any differs (before any training collective).

    Examples:
        >>> check_configs({"lr": 0.1})          # one process: nothing to compare
    """
    from .env import gather_objects

    problem = config_mismatch(gather_objects(config, group))
    if problem:
        raise CodistillError(f"the codistillation ranks were started with different configs ({problem}); start "
                             f"every group from the same command and run directory (only --group may differ)")

