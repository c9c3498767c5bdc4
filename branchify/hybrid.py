"""OKDPH's hybrid-weight model as a part of a branched model: :class:`WeightFusion`.

Attached to a :class:`~branchify.model.BranchedModel` (or a :class:`~branchify.Cohort`) whose
leaves share one architecture, every forward builds the hybrid ``theta_h = sum_l r_l theta_l``
from the current leaves (:func:`branchify.fusion.hybrid_state`), runs it on the batch and returns
its logits in ``out.hybrid`` (a one-leaf :class:`~branchify.outputs.BranchedOutput`), where an
aggregator (:class:`~branchify.aggregators.HybridTeacher`) turns it into teacher targets. The
fuse-back (:func:`branchify.fusion.fuse_back`) runs on a schedule, never on the per-batch path
unless asked: ``fuse_every="1_epoch"`` fuses when the epoch given to ``okd.set_epoch`` moves past
an epoch ``e`` with ``e % 1 == 0`` (the official code fuses after epoch ``e`` when ``epoch % gap
== 0``, ``src/OKDPH.py`` lines 137-141); ``"5_batch"`` after every optimiser step ``s`` (counted
from 0 over the run) with ``s % 5 == 0`` (the code counts batches within each epoch, lines 101-103:
the same whenever the epoch length is a multiple of the gap), applied at the start of the next
forward (steps are seen by a :class:`~branchify.steps.StepWatch`, as
:class:`~branchify.temporal.TemporalMean` sees them). An epoch schedule without any epoch given fails
loudly at the first training forward.

The hybrid network itself (a module of the original class, hidden from ``parameters()``) keeps the
weights of the last hybrid and the BatchNorm statistics its own training forward updated - what the
code's extra network holds when it is fused back - and is saved in ``state_dict`` under
``fusion.model.*`` so a resumed run fuses the same weights.

Examples:
    >>> import torch, branchify as bf
    >>> from torch import nn
    >>> from branchify.hybrid import WeightFusion
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> bm = bf.branchify(net, bf.Spec(splits=["3"], fanout=[2]))
    >>> fusion = WeightFusion(fuse_every=None).attach(bm)
    >>> bm(torch.randn(5, 4)).hybrid.logits[0].shape
    torch.Size([5, 3])
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .contract import LeafModel
from .fusion import COEFFICIENTS, FusionError, _template, coefficients, fuse_back, hybrid_state, leaf_states, schedule
from .hidden import HiddenModelHolder
from .outputs import BranchedOutput, classifier_logits
from .steps import StepWatch

__all__ = ["WeightFusion"]


class WeightFusion(HiddenModelHolder):
    """OKDPH's hybrid-weight model: built from the leaves every forward, fused back on a schedule.

    Args:
        coefficients: ``"mean"`` (``r_l = 1/N``, the code's ``--hwm mean`` default) or
            ``"dirichlet"`` (``r ~ Dirichlet(1, ..., 1)`` drawn every forward from torch's RNG).
        grad: let the hybrid's loss train the leaves through the mixture (the paper's reading);
            ``False`` (the code) runs the hybrid without autograd.
        gamma: share of the hybrid in a fused leaf (the code's ``--gamma``, 0.5).
        fuse_every: ``"1_epoch"`` (the code's ``--interval`` default), ``"<k>_batch"``,
            ``"<k>_epoch"`` or ``None`` (never).

    Examples:
        >>> fusion = WeightFusion("mean", gamma=0.5, fuse_every="1_epoch").attach(bm)   # doctest: +SKIP
        >>> fusion.fuse()            # fuse back now, whatever the schedule              # doctest: +SKIP
    """

    steps: torch.Tensor
    last_epoch: torch.Tensor

    def __init__(self, coefficients: str = "mean", *, grad: bool = False, gamma: float = 0.5,
                 fuse_every: str | tuple[int, str] | None = "1_epoch") -> None:
        super().__init__()
        if coefficients not in COEFFICIENTS:
            raise FusionError(f"coefficients={coefficients!r} is unknown; choose 'mean' (the official code's "
                              f"default) or 'dirichlet' (random convex weights every batch)")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise FusionError(f"gamma={gamma!r} must be in [0, 1] (the share of the hybrid in each fused leaf)")
        self.kind = coefficients
        self.grad = bool(grad)
        self.gamma = float(gamma)
        self.every = schedule(fuse_every)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps seen
        self.register_buffer("last_epoch", torch.full((), -1, dtype=torch.long))  # last epoch given
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))  # a step not yet counted (saved)
        object.__setattr__(self, "_owner", None)
        object.__setattr__(self, "model", None)  # the hybrid network: hidden from parameters() and DDP
        self._watch: StepWatch | None = None
        self._built = False  # a hybrid was built (or loaded): there is something to fuse back
        self.last_coefficients: list[float] | None = None

    # ------------------------------------------------------------------ attaching
    def attach(self, model: LeafModel) -> "WeightFusion":
        """Check that ``model``'s leaves share one architecture and register as ``model.fusion``.

        Examples:
            >>> fusion = WeightFusion().attach(bm)       # doctest: +SKIP
        """
        if not isinstance(model, LeafModel):
            raise FusionError(f"WeightFusion attaches to a branched model (BranchedModel, Cohort), got "
                              f"{type(model).__name__}")
        if self._owner is not None or model._modules.get("fusion") is not None:
            raise FusionError("this model already has a WeightFusion (model.fusion), or this one is attached; "
                              "create one per model")
        if model.num_leaves < 2:
            raise FusionError(f"a hybrid mixes two or more leaves; the model has {model.num_leaves}")
        leaf_states(model)  # raises when the leaves differ
        hybrid = _template(model)
        hybrid.requires_grad_(False)
        object.__setattr__(self, "model", hybrid.train(model.training))
        object.__setattr__(self, "_owner", model)
        self._watch = StepWatch(self)
        model.fusion = self
        model.register_forward_pre_hook(_before_forward)
        return self

    def watched_params(self) -> list[torch.Tensor]:
        """The leaves' parameters, whose optimiser steps the batch schedule counts."""
        return [p for name, p in self._require_owner().named_parameters() if not name.startswith("aggregator.")]

    def _require_owner(self) -> LeafModel:
        if self._owner is None:
            raise FusionError("this WeightFusion is not attached: call WeightFusion(...).attach(model)")
        return self._owner

    # ------------------------------------------------------------------ the hybrid
    def forward(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """Build the hybrid from the current leaves and run it; its logits as a one-leaf output."""
        owner = self._require_owner()
        if self.training and self.every is not None and self.every[1] == "epoch" and int(self.last_epoch) < 0:
            raise FusionError("the hybrid is fused back every epoch, but no epoch was given: call "
                              "okd.set_epoch(epoch, total_epochs) at the start of every epoch (or "
                              "model.fusion.on_epoch(epoch) without OnlineKD), or pass fuse_every=None")
        states = leaf_states(owner)
        r = coefficients(len(states), self.kind)
        self.last_coefficients = r
        mixed = hybrid_state(states, r, detach=not self.grad)
        target = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, t in target.items():  # the network the code fuses back holds these weights
                t.copy_(mixed[k])
        views = getattr(owner, "views", None)
        if self.training and views is not None:  # the hybrid's own view: leaf index N
            if not args:
                raise FusionError("views apply to the first positional input; call the model with the batch first")
            args = (views(args[0], len(states)), *args[1:])
        if self.grad:
            params = {k: mixed[k] for k, _ in self.model.named_parameters()}
            result = torch.func.functional_call(self.model, params, args, kwargs, strict=False)
        else:
            with torch.no_grad():
                result = self.model(*args, **kwargs)
        self._built = True
        z = classifier_logits(result)
        if z is None:
            raise FusionError(f"the hybrid returned {type(result).__name__}; expected logits")
        return BranchedOutput(logits=[z], features=[None], feature_maps=[None], leaf_paths=[()])

    def fuse(self, gamma: float | None = None) -> None:
        """Fuse the last hybrid back into every leaf now: ``leaf = gamma * hybrid + (1 - gamma) * leaf``.

        Examples:
            >>> bm.fusion.fuse(1.0)       # every leaf becomes the hybrid     # doctest: +SKIP
        """
        owner = self._require_owner()
        fuse_back(leaf_states(owner), self.model.state_dict(keep_vars=True), self.gamma if gamma is None else gamma)
        self._watch.mark_seen()  # the fused weights are not an optimiser step

    # ------------------------------------------------------------------ the schedule
    def on_epoch(self, epoch: float, total_epochs: int | None = None) -> bool:
        """Tell the fusion the current epoch (``OnlineKD.set_epoch`` does); fuses when an epoch
        ``e`` with ``e % k == 0`` has just ended (``fuse_every="<k>_epoch"``). Returns whether it fused.

        Examples:
            >>> bm.fusion.on_epoch(1)     # epoch 0 ended: fused with "1_epoch"   # doctest: +SKIP
            True
        """
        e = int(math.floor(epoch))
        last = int(self.last_epoch)
        if e <= last:
            return False
        self.last_epoch.fill_(e)
        ended = e - 1
        if self.every is None or self.every[1] != "epoch" or ended < 0 or ended % self.every[0] or not self._built:
            return False
        self.fuse()
        return True

    @torch.compiler.disable
    def _batch_schedule(self) -> None:
        """Before a training forward: count an optimiser step if the weights moved; fuse by batch."""
        stepped = self._watch.stepped()  # always asked: it also takes the current weights as seen
        if stepped or bool(self.pending):
            self.pending.fill_(False)
            step = int(self.steps)
            self.steps += 1
            if self.every is not None and self.every[1] == "batch" and step % self.every[0] == 0:
                self.fuse()

    # ------------------------------------------------------------------ nn.Module plumbing
    def _settle(self) -> None:
        if self._watch is not None and self._watch.pending():
            self.pending.fill_(True)  # stepped since the last forward: counted after a resume too
            self._watch.mark_seen()

    def train(self, mode: bool = True) -> "WeightFusion":
        nn.Module.train(self, mode)  # no settling: switching mode is not a step
        if self.model is not None:
            self.model.train(mode)
        return self

    def _moved(self) -> None:
        self._watch.forget()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.model is not None:
            self._watch.forget()
            self._built = True

    def extra_repr(self) -> str:
        return f"coefficients={self.kind!r}, grad={self.grad}, gamma={self.gamma}, fuse_every={self.every}"


def _before_forward(model: nn.Module, _args: Any) -> None:
    fusion = model._modules.get("fusion")
    if isinstance(fusion, WeightFusion) and model.training:
        fusion._batch_schedule()
