"""Noticing optimiser steps without being told: parameter version counters plus a global
optimiser-step hook.

Model parts that act once per optimiser step (:class:`~branchify.temporal.TemporalMean`'s update,
:class:`~branchify.hybrid.WeightFusion`'s batch schedule) ask a :class:`StepWatch` at the start of a
forward whether the weights were stepped since they last looked. Two signals, either is enough:

- the parameters' version counters (``p._version``), bumped by every in-place update through
  autograd - any ``torch.optim`` optimiser with the for-loop or ``foreach`` kernels, or a
  hand-written ``p.add_(...)`` under ``no_grad``;
- a process-wide ``torch.optim`` step post-hook, for kernels that do not bump version counters
  (``fused=True`` optimisers): it flags every watch whose parameters the stepped optimiser holds.

Only writes through ``.data`` escape both; call the part's update yourself then.

Examples:
    >>> import torch
    >>> class Part:
    ...     def __init__(self, w): self.w = w
    ...     def watched_params(self): return [self.w]
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> watch = StepWatch(Part(w))
    >>> watch.stepped()                       # the first look
    False
    >>> opt = torch.optim.SGD([w], lr=1.0); w.grad = torch.ones(2); opt.step()
    >>> watch.stepped(), watch.stepped()
    (True, False)
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["StepWatch"]

_WATCHES: "weakref.WeakSet[StepWatch]" = weakref.WeakSet()
_HOOK: Any = None


def _register(watch: "StepWatch") -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
    _WATCHES.add(watch)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    ids: set[int] | None = None
    for watch in list(_WATCHES):
        ids = ids if ids is not None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) in ids for p in watch.owner.watched_params()):
            watch.flagged = True


class StepWatch:
    """Answers "were these parameters stepped since I last asked?" (see the module docstring).

    Args:
        owner: the part that watches; its ``watched_params()`` returns the parameters (called at
            every look, so moved or replaced parameters are followed). A deep copy of the owner
            gets its own watch (copies and unpickled watches register themselves).
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.flagged = False
        self._seen: list[tuple[int, int]] | None = None
        _register(self)

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickling: watch again
        self.__dict__.update(state)
        _register(self)

    def _versions(self) -> list[tuple[int, int]]:
        return [(id(p), p._version) for p in self.owner.watched_params()]

    def stepped(self) -> bool:
        """Whether the parameters changed since the last call (``False`` at the first call)."""
        seen = self._versions()
        changed = self.flagged or (self._seen is not None and seen != self._seen)
        self._seen, self.flagged = seen, False
        return changed

    def pending(self) -> bool:
        """Whether :meth:`stepped` would say ``True`` now (without taking the step as seen)."""
        return self.flagged or (self._seen is not None and self._versions() != self._seen)

    def mark_seen(self) -> None:
        """Take the current parameters as seen (after changing them on purpose, or loading them)."""
        self._seen, self.flagged = self._versions(), False

    def forget(self) -> None:
        """Start over: the next :meth:`stepped` is a first look (after ``.to()``)."""
        self._seen, self.flagged = None, False
