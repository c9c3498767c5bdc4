"""A module that carries a hidden network: outside ``parameters()`` (so optimisers and DDP never see
it), inside ``state_dict()`` under ``<prefix>model.``, and following ``.train()`` / ``.to()``.

:class:`~branchify.TemporalMean` (the EMA copy) and :class:`~branchify.hybrid.WeightFusion` (OKDPH's
hybrid network) both hold one; this is their shared plumbing.

Examples:
    >>> holder = HiddenModelHolder()
    >>> holder.hide(torch.nn.Linear(2, 2))
    >>> sorted(holder.state_dict()), len(list(holder.parameters()))
    (['model.bias', 'model.weight'], 0)
"""
from __future__ import annotations

import torch  # noqa: F401  (the docstring example)
from torch import nn


class HiddenModelHolder(nn.Module):
    """Base of modules whose ``model`` attribute is a network hidden from ``parameters()``.

    Subclasses may override :meth:`_settle` (called before ``train()`` and ``state_dict()``, to
    apply or record work pending from the last optimiser step) and :meth:`_moved` (called after
    ``.to()`` / ``.double()`` moved the hidden network).
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "model", None)

    def hide(self, model: nn.Module | None) -> None:
        """Make ``model`` the hidden network (``None`` removes it)."""
        object.__setattr__(self, "model", model)

    def _settle(self) -> None:
        """Work pending from the last optimiser step, done before ``train()`` / ``state_dict()``."""

    def _moved(self) -> None:
        """Called after the hidden network was moved or cast."""

    def train(self, mode: bool = True):
        self._settle()
        super().train(mode)
        if self.model is not None:
            self.model.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda() reach the hidden network
        super()._apply(fn, recurse)
        if self.model is not None:
            self.model._apply(fn, recurse)
            self._moved()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.model is not None:
            for k, v in self.model.state_dict(keep_vars=keep_vars).items():
                destination[f"{prefix}model.{k}"] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        inner = f"{prefix}model."
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(inner)]  # ours, loaded below
        if self.model is None:
            return
        mine = {k[len(inner):]: v for k, v in state_dict.items() if k.startswith(inner)}
        result = self.model.load_state_dict(mine, strict=False)
        missing_keys.extend(inner + k for k in result.missing_keys)
        unexpected_keys.extend(inner + k for k in result.unexpected_keys)
