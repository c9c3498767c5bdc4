"""The Trainer callback: epoch schedules, loss parts in the logs, ``save_pretrained`` export.

Examples:
    >>> trainer = Trainer(model=branchify_hf("one", bert), args=args, train_dataset=ds,
    ...                   callbacks=[BranchifyCallback()])           # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .wrapper import BranchedHFModel

__all__ = ["BranchifyCallback", "EXPORT_SUBDIR"]

EXPORT_SUBDIR = "exported-target"
"""Folder (in ``output_dir`` and in every checkpoint) that receives the exported target."""


class BranchifyCallback(TrainerCallback):
    """Trainer callback: epoch schedules, loss parts in the logs, ``save_pretrained`` export.

    * ``on_train_begin`` / ``on_step_begin``: ``okd.set_epoch(state.epoch, state.num_train_epochs)``
      - the epoch comes from the Trainer's state, so a run resumed from a checkpoint continues
      its ramps / interval schedules where it stopped.
    * ``on_log``: adds the mean of every loss part since the last log (``"okd/ce/leaf0"``,
      ``"okd/loss/kd"``, ``"okd/ramp"``...) to the training logs and to ``state.log_history``;
      under ``torch.distributed`` the mean is over every rank's forwards (all-reduced - the
      Trainer calls ``on_log`` on every rank), not rank 0's alone.
    * ``on_save``: writes the exported target into ``<checkpoint>/exported-target``;
      ``on_train_end``: into ``<output_dir>/exported-target`` (``save_pretrained`` format,
      loadable with ``from_pretrained`` of the original class).

    Args:
        model: the :class:`BranchedHFModel` (default: the Trainer's model, found in the
            callback arguments).
        export_subdir: folder name of the export inside checkpoints / ``output_dir``
            (``None`` disables exporting).
        log_prefix: prefix of the logged loss parts (``None`` disables logging them).

    Examples:
        >>> trainer = Trainer(model=branched_hf, args=args, train_dataset=ds,
        ...                   callbacks=[BranchifyCallback()])                # doctest: +SKIP
    """

    def __init__(self, model: BranchedHFModel | None = None, *, export_subdir: str | None = EXPORT_SUBDIR,
                 log_prefix: str | None = "okd/") -> None:
        self.model = model
        self.export_subdir = export_subdir
        self.log_prefix = log_prefix

    def _find(self, kwargs: dict) -> BranchedHFModel:
        model = self.model if self.model is not None else kwargs.get("model")
        while not isinstance(model, BranchedHFModel) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # DDP / accelerate wrappers
        if not isinstance(model, BranchedHFModel):
            raise TypeError(f"BranchifyCallback needs the Trainer's model to be a BranchedHFModel (from "
                            f"branchify_hf), got {type(model).__name__}")
        return model

    @staticmethod
    def _set_epoch(model: BranchedHFModel, state: Any) -> None:
        total = int(state.num_train_epochs) if state.num_train_epochs else None
        epoch = float(state.epoch or 0.0)
        model.okd.set_epoch(epoch, total if total and total >= 1 else None)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        self._set_epoch(self._find(kwargs), state)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        self._set_epoch(self._find(kwargs), state)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.log_prefix is None or logs is None or "loss" not in logs:
            return  # only training logs carry the parts (eval logs are eval_*)
        parts = self._find(kwargs).pop_logged_parts()
        extra = {f"{self.log_prefix}{k}": round(v, 6) for k, v in parts.items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.export_subdir is None or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            self._find(kwargs).save_target(os.path.join(checkpoint, self.export_subdir))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.export_subdir is None or not state.is_world_process_zero:
            return
        self._find(kwargs).save_target(os.path.join(args.output_dir, self.export_subdir))
