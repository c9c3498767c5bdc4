"""Temporal-mean teachers: an exponential moving average (EMA) of a branched model's weights.

A :class:`TemporalMean` keeps an EMA copy of every leaf of a :class:`~branchify.contract.LeafModel`
(the whole tree: trunk and branches of a :class:`~branchify.model.BranchedModel`, or every peer of a
:class:`~branchify.Cohort`; the aggregator is not copied). Attached to a model, it becomes part of
it: every forward returns the copy's leaf outputs in ``out.temporal`` (a detached
:class:`~branchify.outputs.BranchedOutput`), so any aggregator can teach with them (PCL's "temporal
mean teacher"), ``state_dict()`` holds it under ``temporal.*``, and with ``deploy=True``
``model.export()`` returns the EMA of the target leaf (PCL deploys the temporal mean).

The update, with decay ``d`` and ``n`` updates done before (the PCL reproduction
``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473``,
``src/utils/ema.py`` lines 3-7, called after every optimiser step in ``src/trainer.py`` line 111)::

    a = min(1 - 1 / (n + 1), d)   if warmup   else   d
    ema = a * ema + (1 - a) * param

so with ``warmup`` (the default) the first update copies the weights and the EMA is the plain
mean of the weights seen until ``1 / (1 - d)`` updates. Only parameters are averaged; with
``buffers="own"`` (the default when it teaches) the copy's BatchNorm statistics are its own,
collected by its training-mode forwards like the reference's separate mean model; with
``buffers="copy"`` they are copied from the live model at every update.

**When it updates (nothing to call).** At the start of every forward - and in ``state_dict()``,
``export()``, ``train()``/``eval()`` - it compares the tracked parameters' version counters
(``p._version``, bumped by every in-place optimiser update) with those it saw last time; if they
moved, the weights were stepped and it applies one update with the current weights first. The
teacher a forward sees therefore includes every optimiser step taken before it, exactly as an
update right after ``optimizer.step()``; only its bookkeeping runs one step later, and the
flushes make that invisible to checkpoints and exports. Several steps without a forward in
between count as one update; gradient accumulation (several forwards per step) counts one.
Why not only an optimiser step post-hook: per optimiser it needs the optimiser (a line a user
can forget) and it misses hand-written updates; version counters see any in-place change of the
weights, whoever makes it. But ``fused=True`` optimisers write without bumping version counters,
so a process-wide ``torch.optim`` step post-hook flags the steps of any optimiser holding these
weights as well (:class:`~branchify.steps.StepWatch`). Only writes through ``.data`` escape both:
call ``update()`` then.

Distributed: under DDP every rank applies the same update to the same weights (the copy is not a
parameter, so DDP neither reduces nor broadcasts it). An FSDP2-sharded model is refused with an
error (the copy would be averaged against unsharded views). ``torch.compile`` of the model works:
the bookkeeping runs outside the compiled graph, the copy's forward inside it.

Examples:
    >>> import torch, branchify as bf
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> bm = bf.branchify(net, bf.Spec(splits=["3"], fanout=[2]))
    >>> ema = bf.TemporalMean(decay=0.99).attach(bm)
    >>> opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    >>> out = bm(torch.randn(5, 4)); out.temporal.logits[0].shape
    torch.Size([5, 3])
    >>> out.logits[0].sum().backward(); opt.step()
    >>> _ = bm(torch.randn(5, 4)); int(ema.num_updates)      # the step was seen by this forward
    1
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import nn

from .contract import LeafModel
from .errors import BranchifyError
from .hidden import HiddenModelHolder
from .outputs import BranchedOutput
from .steps import StepWatch

__all__ = ["TemporalMean", "TemporalMeanError"]

BUFFER_MODES = ("own", "copy")
SKIP = ("aggregator.", "temporal.", "fusion.")  # owner submodules the copy does not hold


class TemporalMeanError(BranchifyError, ValueError):
    """A temporal-mean teacher that cannot be built or attached (says what would work)."""


class TemporalMean(HiddenModelHolder):
    """An EMA copy of a leaf model, kept up to date without any call (see the module docstring).

    Args:
        decay: ``d`` in ``ema = a * ema + (1 - a) * param`` (0 <= d < 1; PCL: 0.999).
        warmup: ``a = min(1 - 1/(n + 1), d)`` (the reference's warm-up) instead of ``a = d``.
        teach: run the copy in every forward and return its outputs in ``out.temporal``
            (``False``: only keep the average, e.g. to deploy it; no extra forward).
        deploy: ``model.export()`` returns the EMA of the leaf instead of the live weights.
        buffers: ``"own"`` (the copy's BatchNorm statistics come from its own forwards; needs
            ``teach``) or ``"copy"`` (copied from the live model at every update); ``None``:
            ``"own"`` when teaching, else ``"copy"``.

    Attributes:
        num_updates: updates applied so far (a buffer: saved, restored, drives the warm-up).

    Examples:
        >>> ema = TemporalMean(0.999, deploy=True).attach(model)     # doctest: +SKIP
        >>> teacher_logits = model(x).temporal.logits                 # doctest: +SKIP
    """

    num_updates: torch.Tensor

    def __init__(self, decay: float = 0.999, *, warmup: bool = True, teach: bool = True, deploy: bool = False,
                 buffers: str | None = None) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise TemporalMeanError(f"decay={decay!r} must be a float in [0, 1) (e.g. 0.999: PCL's temporal mean)")
        buffers = buffers if buffers is not None else ("own" if teach else "copy")
        if buffers not in BUFFER_MODES:
            raise TemporalMeanError(f"buffers={buffers!r} is unknown; choose 'own' (the copy's BatchNorm statistics "
                                    f"come from its own forwards) or 'copy' (copied from the live model)")
        if buffers == "own" and not teach:
            raise TemporalMeanError("buffers='own' collects the copy's statistics in its own forwards, but teach=False "
                                    "runs none; pass buffers='copy' (or teach=True)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.teach = bool(teach)
        self.deploy = bool(deploy)
        self.buffers_mode = buffers
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        object.__setattr__(self, "_owner", None)
        object.__setattr__(self, "model", None)  # the EMA copy: hidden from parameters() and DDP
        self._watch: StepWatch | None = None

    # ------------------------------------------------------------------ attaching
    def attach(self, model: LeafModel) -> "TemporalMean":
        """Copy ``model``'s current weights and register as ``model.temporal``; returns self.

        Attach before ``torch.compile`` (wrapping in DDP may come before or after).

        Examples:
            >>> ema = TemporalMean(0.999).attach(bm)      # doctest: +SKIP
        """
        if not isinstance(model, LeafModel):
            inner = getattr(model, "module", None)
            hint = " (attach to the unwrapped model: model.module)" if isinstance(inner, LeafModel) else ""
            raise TemporalMeanError(f"TemporalMean attaches to a branched model (BranchedModel, Cohort), got "
                                    f"{type(model).__name__}{hint}")
        if self._owner is not None:
            raise TemporalMeanError("this TemporalMean is already attached to a model; create one per model")
        if model._modules.get("temporal") is not None:
            raise TemporalMeanError("the model already has a temporal-mean teacher (model.temporal); remove it "
                                    "first with model.temporal = None")
        parts = {k: model._modules[k] for k in ("aggregator", "fusion") if k in model._modules}  # not leaves
        for k in parts:
            model._modules[k] = None
        try:
            ema_model = copy.deepcopy(model)
        finally:
            for k, v in parts.items():
                model._modules[k] = v
        ema_model.requires_grad_(False)
        ema_model.train(model.training)
        object.__setattr__(self, "model", ema_model)
        object.__setattr__(self, "_owner", model)
        self._watch = StepWatch(self)
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            self.num_updates = self.num_updates.to(ref.device)
        model.temporal = self  # registered as a submodule: state_dict, train/eval and .to() reach it
        model.register_load_state_dict_post_hook(_after_load)
        return self

    def _require_owner(self) -> LeafModel:
        if self._owner is None:
            raise TemporalMeanError("this TemporalMean is not attached: call TemporalMean(...).attach(model)")
        return self._owner

    def _pairs(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """(live parameter, its EMA tensor) for every parameter of the owner's leaves."""
        ema = dict(self.model.named_parameters())
        for name, p in self._require_owner().named_parameters():
            if not name.startswith(SKIP):
                yield p, ema[name]

    def watched_params(self) -> list[torch.Tensor]:
        """The live parameters the EMA follows (what :class:`~branchify.steps.StepWatch` watches)."""
        return [p for p, _ in self._pairs()]

    # ------------------------------------------------------------------ the update
    def decay_at(self, n: int) -> float:
        """The factor ``a`` of the update after ``n`` earlier ones.

        Examples:
            >>> TemporalMean(0.999).decay_at(0), TemporalMean(0.999).decay_at(1), TemporalMean(0.9).decay_at(99)
            (0.0, 0.5, 0.9)
        """
        return min(1.0 - 1.0 / (n + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Apply one update now with the current weights (the automatic path calls this; call it
        yourself only after changing weights through ``.data``).

        Examples:
            >>> ema.update()          # doctest: +SKIP
        """
        owner = self._require_owner()
        pairs = list(self._pairs())
        if any(type(p).__name__ == "DTensor" for p, _ in pairs):
            raise TemporalMeanError("TemporalMean does not support FSDP2-sharded (DTensor) parameters; use DDP, or "
                                    "keep the EMA outside the sharded model")
        a = self.decay_at(int(self.num_updates))
        emas = [e for _, e in pairs]
        torch._foreach_mul_(emas, a)
        torch._foreach_add_(emas, [p.detach() for p, _ in pairs], alpha=1.0 - a)
        if self.buffers_mode == "copy":
            live = dict(owner.named_buffers())
            for name, b in self.model.named_buffers():
                if name in live:
                    b.copy_(live[name])
        self.num_updates += 1
        self._watch.mark_seen()

    @torch.compiler.disable
    def sync(self) -> bool:
        """Apply the pending update if the weights changed since the last look; returns whether it did.

        Runs by itself at every forward, ``state_dict()``, ``export()`` and ``train()``/``eval()``.

        Examples:
            >>> ema.sync()            # doctest: +SKIP
            False
        """
        if self._owner is None or not self._watch.stepped():
            return False
        self.update()
        return True

    def mark_synced(self) -> None:
        """Take the current weights as already averaged (after loading a checkpoint)."""
        if self._watch is not None:
            self._watch.mark_seen()

    # ------------------------------------------------------------------ teaching and deployment
    def forward(self, *args: Any, **kwargs: Any) -> BranchedOutput | None:
        """Sync, then the copy's leaf outputs on the inputs (detached), or ``None`` without ``teach``."""
        self.sync()
        if not self.teach:
            return None
        with torch.no_grad():
            return self.model.forward_leaves(*args, **kwargs)

    def export(self, leaf: int | None = None) -> nn.Module:
        """The EMA of ``leaf`` (default: the target) as the deployable model, like ``model.export``.

        Examples:
            >>> student = model.temporal.export()     # doctest: +SKIP
        """
        owner = self._require_owner()
        self.sync()
        exported = self.model.export(leaf)
        fresh = _live_export(owner, leaf)
        fresh.load_state_dict(exported.state_dict(), strict=True)  # real (trainable) parameters again
        return fresh

    # ------------------------------------------------------------------ nn.Module plumbing
    def _settle(self) -> None:  # train() and state_dict() see the EMA of the latest weights
        self.sync()

    def _moved(self) -> None:
        self._watch.forget()

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, warmup={self.warmup}, teach={self.teach}, deploy={self.deploy}, "
                f"buffers={self.buffers_mode!r}")


def _after_load(model: nn.Module, _incompatible: Any) -> None:
    """After ``model.load_state_dict``: the loaded weights are the state the saved EMA had seen."""
    temporal = model._modules.get("temporal")
    if isinstance(temporal, TemporalMean):
        temporal.mark_synced()


def _live_export(owner: LeafModel, leaf: int | None) -> nn.Module:
    """``owner.export(leaf)`` of the live weights (bypassing ``deploy``)."""
    temporal = owner._modules.get("temporal")
    deploy = getattr(temporal, "deploy", False)
    if temporal is not None:
        temporal.deploy = False
    try:
        return owner.export(leaf)
    finally:
        if temporal is not None:
            temporal.deploy = deploy
