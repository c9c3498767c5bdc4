"""PyTorch Lightning integration: a callback for schedules, logging, resumable state and export.

:class:`BranchifyCallback` does for a ``lightning.Trainer`` what the training loop of a plain
script does around :class:`~branchify.OnlineKD`:

* drives ``okd.set_step`` (or ``okd.set_epoch``) from the Trainer's epoch and batch, with the
  run length from ``max_epochs`` (or ``max_steps``), so the KD ramp follows the run;
* logs every loss part (``"okd/ce/leaf0"``, ``"okd/loss/kd"``, ``"okd/ramp"``...) with
  ``pl_module.log(..., sync_dist=True)``: under DDP the logged value is the cross-rank mean;
* saves ``okd.state_dict()`` in every Lightning checkpoint and restores it, so
  ``trainer.fit(module, ckpt_path=...)`` resumes the schedule where it stopped (the model's and
  the aggregator's weights are in the module's ``state_dict`` already: the branched model owns
  its aggregator);
* writes the exported target (``model.export()``: an instance of the original class) and a
  small ``branchify.json`` into ``export_dir`` at the end of ``fit`` (global rank 0 only).

:class:`OnlineKDModule` is an optional ``LightningModule`` around a ``(model, okd)`` pair whose
``training_step`` returns what the callback logs (:func:`step_output`); a hand-written module
only has to return ``step_output(loss)`` from its own ``training_step``.

DDP: build the branched model **and the loss** (which attaches the aggregator) in the module's
``__init__`` - before ``trainer.fit`` - and never attach an aggregator later. DDP synchronises
only the parameters it saw when the Trainer wrapped the module; the aggregator is a submodule
of the branched model, so it is then trained and kept identical on every rank. (Buffers such
as BatchNorm running statistics follow DDP's usual rule: rank 0's are broadcast at the start of
every forward, so after the last step they are rank-local; checkpoints and the export take rank
0's.)

Examples:
    >>> import lightning as L, torch, branchify as bf
    >>> from branchify.integrations.lightning import BranchifyCallback, OnlineKDModule, load_target
    >>> model, okd = bf.method("one", net)                                        # doctest: +SKIP
    >>> module = OnlineKDModule(model, okd, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=300, callbacks=[BranchifyCallback(export_dir="student")])  # doctest: +SKIP
    >>> trainer.fit(module, train_loader)                                         # doctest: +SKIP
    >>> student = load_target("student", type(net)())     # the original class, trained  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

try:
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("branchify.integrations.lightning needs PyTorch Lightning 2.x: "
                      "pip install 'branchify[lightning]'") from exc

from ..contract import LeafModel
from ..export import INFO_FILE, WEIGHTS, load_deployed, save_deployed
from ..online_kd import LossOutput, OnlineKD

__all__ = ["BranchifyCallback", "CHECKPOINT_KEY", "OnlineKDModule", "PARTS_KEY", "load_target", "save_target",
           "step_output"]

PARTS_KEY = "okd_parts"
"""Key of the loss parts in the dict ``training_step`` returns (see :func:`step_output`)."""

CHECKPOINT_KEY = "branchify"
"""Key of the loss's schedule state in a Lightning checkpoint."""

EXPORT_INFO = INFO_FILE
"""The side file written beside the weights (the schema of :mod:`branchify.export`)."""


# ---------------------------------------------------------------------- helpers
def step_output(loss: LossOutput) -> dict[str, Any]:
    """What ``training_step`` returns so that :class:`BranchifyCallback` logs the loss parts.

    ``{"loss": loss.total, "okd_parts": loss.parts}``: Lightning backpropagates ``"loss"`` and
    hands the rest to the callbacks' ``on_train_batch_end``.

    Examples:
        >>> def training_step(self, batch, batch_idx):
        ...     x, y = batch
        ...     return step_output(self.okd(self.model(x), y))                   # doctest: +SKIP
    """
    if not isinstance(loss, LossOutput):
        raise TypeError(f"step_output takes the LossOutput that okd(model(x), y) returns, got {type(loss).__name__}")
    return {"loss": loss.total, PARTS_KEY: loss.parts}


def find_leaf_model(pl_module: nn.Module) -> LeafModel:
    """The outermost branched model (a :class:`~branchify.contract.LeafModel`) inside ``pl_module``.

    Examples:
        >>> find_leaf_model(module) is module.model                             # doctest: +SKIP
        True
    """
    for module in pl_module.modules():
        if isinstance(module, LeafModel):
            return module
    raise TypeError(f"{type(pl_module).__name__} holds no branched model: assign the model from "
                    f"branchify.method() / branchify.branchify() to an attribute (self.model = model), or pass "
                    f"BranchifyCallback(model=...)")


def find_okd(pl_module: nn.Module) -> OnlineKD:
    """The one :class:`~branchify.OnlineKD` held as an attribute of ``pl_module``.

    Examples:
        >>> find_okd(module) is module.okd                                      # doctest: +SKIP
        True
    """
    found = [v for v in vars(pl_module).values() if isinstance(v, OnlineKD)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise TypeError(f"{type(pl_module).__name__} has no OnlineKD attribute: keep the loss on the module "
                        f"(self.okd = okd, built before trainer.fit) or pass BranchifyCallback(okd=okd)")
    raise TypeError(f"{type(pl_module).__name__} holds {len(found)} OnlineKD objects; pass the one to drive "
                    f"with BranchifyCallback(okd=...)")


def total_epochs(trainer: "L.Trainer") -> int | None:
    """The run length in epochs: ``max_epochs``, else derived from ``max_steps`` (``None`` if unbounded).

    Examples:
        >>> total_epochs(L.Trainer(max_epochs=300))                             # doctest: +SKIP
        300
    """
    if trainer.max_epochs is not None and trainer.max_epochs >= 1:
        return int(trainer.max_epochs)
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps > 0 and 0 < batches < math.inf:
        steps_per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        return max(1, math.ceil(trainer.max_steps / steps_per_epoch))
    return None


def save_target(model: LeafModel, directory: str | os.PathLike, *, leaf: int | None = None,
                format: str = "torch", extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.export(leaf)``'s ``state_dict`` and ``branchify.json`` into ``directory``.

    ``format="torch"`` writes ``model.pt`` (``torch.save`` of the state dict), ``"safetensors"``
    writes ``model.safetensors``. ``branchify.json`` (:mod:`branchify.export`'s schema) names the
    class (``"module.QualName"``), the weights file, the leaf and the spec; reload with
    :func:`load_target` (or :func:`branchify.export.load_deployed`, which needs no Lightning).

    Examples:
        >>> save_target(model, "student")                                       # doctest: +SKIP
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> net.load_state_dict(torch.load("student/model.pt"), strict=True)    # doctest: +SKIP
    """
    if format not in WEIGHTS:
        raise ValueError(f"format must be one of {sorted(WEIGHTS)}, got {format!r}")
    if not isinstance(model, LeafModel):
        raise TypeError(f"save_target needs the branched model (not a DDP wrapper), got {type(model).__name__}")
    save_deployed(model.export(leaf), directory, format=format, leaf=model.target if leaf is None else leaf,
                  spec=model.spec, extra=extra)
    return Path(directory)


def load_target(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load what :func:`save_target` wrote into ``model`` (an instance of the original class), strictly.

    Examples:
        >>> net = load_target("student", TinyNet(num_classes=10))              # doctest: +SKIP
    """
    return load_deployed(directory, model)


# ---------------------------------------------------------------------- the callback
class BranchifyCallback(L.Callback):
    """Lightning callback: KD schedules, loss-part logging, resumable loss state, target export.

    * ``on_train_batch_start``: ``okd.set_step(epoch * batches + batch_idx, batches, total)``
      (``per_step=False``: ``on_train_epoch_start`` calls ``okd.set_epoch(epoch, total)``);
      ``total`` is :func:`total_epochs`. Steps count batches, so gradient accumulation does
      not change the ramp.
    * ``on_train_batch_end``: ``pl_module.log(prefix + name, value, sync_dist=True)`` for every
      part of the dict that ``training_step`` returned under ``"okd_parts"`` (:func:`step_output`);
      with ``on_epoch=True`` (default) Lightning logs the epoch mean (weighted by batch size).
    * ``on_save_checkpoint`` / ``on_load_checkpoint``: ``okd.state_dict()`` under
      ``checkpoint["branchify"]``.
    * ``on_fit_end`` (global rank 0): :func:`save_target` into ``export_dir``.

    Args:
        okd: the loss (default: the one :class:`~branchify.OnlineKD` attribute of the module).
        model: the branched model (default: the outermost one inside the module).
        per_step: move the ramp every batch (default) or once per epoch.
        log_prefix: prefix of the logged parts; ``None`` logs nothing.
        on_step: forwarded to ``pl_module.log`` (step values sync every step).
        on_epoch: forwarded to ``pl_module.log`` (the epoch mean, weighted by batch size).
        export_dir: where ``on_fit_end`` writes the exported target (``None``: no export).
        export_format: ``"torch"`` (``model.pt``) or ``"safetensors"``.

    Examples:
        >>> callbacks = [BranchifyCallback(export_dir="out/student")]                    # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=300, callbacks=callbacks)                     # doctest: +SKIP
        >>> trainer.fit(module, loader, ckpt_path="last")  # weights, optimiser and KD ramp  # doctest: +SKIP
    """

    def __init__(self, okd: OnlineKD | None = None, *, model: LeafModel | None = None, per_step: bool = True,
                 log_prefix: str | None = "okd/", on_step: bool = False, on_epoch: bool = True,
                 export_dir: str | os.PathLike | None = None, export_format: str = "torch") -> None:
        if okd is not None and not isinstance(okd, OnlineKD):
            raise TypeError(f"okd must be a branchify.OnlineKD, got {type(okd).__name__}")
        if model is not None and not isinstance(model, LeafModel):
            raise TypeError(f"model must be the branched model (before any wrapping), got {type(model).__name__}")
        if export_format not in WEIGHTS:
            raise ValueError(f"export_format must be one of {sorted(WEIGHTS)}, got {export_format!r}")
        if log_prefix is not None and not (on_step or on_epoch):
            raise ValueError("on_step and on_epoch are both False, so nothing would be logged; set one, or "
                             "log_prefix=None to log nothing")
        self.okd = okd
        self.model = model
        self.per_step = per_step
        self.log_prefix = log_prefix
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.export_format = export_format
        self._warned_unsized = False

    def _okd(self, pl_module: nn.Module) -> OnlineKD:
        return self.okd if self.okd is not None else find_okd(pl_module)

    def _model(self, pl_module: nn.Module) -> LeafModel:
        return self.model if self.model is not None else find_leaf_model(pl_module)

    # -------------------------------------------------------------- schedules
    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Find the loss and the model now, so a missing one fails before any training."""
        self._okd(pl_module)
        self._model(pl_module)

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Set the epoch (every batch refines it when ``per_step``)."""
        self._okd(pl_module).set_epoch(trainer.current_epoch, total_epochs(trainer))

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        """``okd.set_step`` from the position in the run (batches, from 0)."""
        if not self.per_step:
            return
        batches = trainer.num_training_batches
        if not 0 < batches < math.inf:
            if not self._warned_unsized:
                rank_zero_warn("BranchifyCallback: the train dataloader has no length, so the KD ramp moves once "
                               "per epoch; give the dataset a __len__ (or set limit_train_batches) for per-step ramps")
                self._warned_unsized = True
            return
        batches = int(batches)
        self._okd(pl_module).set_step(trainer.current_epoch * batches + batch_idx, batches, total_epochs(trainer))

    # -------------------------------------------------------------- logging
    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the loss parts ``training_step`` returned (cross-rank mean under DDP)."""
        if self.log_prefix is None or outputs is None:  # None: the step was skipped
            return
        parts = outputs.get(PARTS_KEY) if isinstance(outputs, Mapping) else None
        if parts is None:
            raise TypeError(f"BranchifyCallback logs the loss parts, but training_step returned "
                            f"{type(outputs).__name__} without {PARTS_KEY!r}: return "
                            f"branchify.integrations.lightning.step_output(loss) (= {{'loss': loss.total, "
                            f"{PARTS_KEY!r}: loss.parts}}), or pass BranchifyCallback(log_prefix=None)")
        for name, value in parts.items():
            pl_module.log(f"{self.log_prefix}{name}", value.detach().float(), on_step=self.on_step,
                          on_epoch=self.on_epoch, sync_dist=True)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """Store ``okd.state_dict()`` (the schedule position) in the checkpoint."""
        checkpoint[CHECKPOINT_KEY] = {"okd": self._okd(pl_module).state_dict()}

    def on_load_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """Restore the schedule position saved by :meth:`on_save_checkpoint`."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            rank_zero_warn(f"BranchifyCallback: the checkpoint has no {CHECKPOINT_KEY!r} entry (it was saved "
                           f"without this callback); the KD schedule restarts from the Trainer's epoch")
            return
        self._okd(pl_module).load_state_dict(state["okd"])

    # -------------------------------------------------------------- export
    def on_fit_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Write the exported target into ``export_dir`` (global rank 0 only)."""
        if self.export_dir is None or not trainer.is_global_zero:
            return
        save_target(self._model(pl_module), self.export_dir, format=self.export_format,
                    extra={"epoch": trainer.current_epoch, "global_step": trainer.global_step})


# ---------------------------------------------------------------------- the module
class OnlineKDModule(L.LightningModule):
    """A ``LightningModule`` that trains a branched model with its :class:`~branchify.OnlineKD` loss.

    ``training_step`` expects ``(inputs, labels)`` batches and returns :func:`step_output`;
    ``validation_step`` logs the target leaf's ``val/ce`` and ``val/acc``. Override
    :meth:`split_batch` for other batch layouts. Build ``model`` and ``okd`` (which attaches the
    aggregator) before the Trainer sees the module, as ``bf.method`` does.

    Args:
        model: the branched model; it owns the aggregator (in ``state_dict`` and ``parameters()``).
        okd: its loss.
        optimizer: ``params -> torch.optim.Optimizer``, e.g. ``partial(torch.optim.SGD, lr=0.1)``.
        lr_scheduler: optional ``optimizer -> LR scheduler`` (stepped once per epoch).

    Examples:
        >>> model, okd = bf.method("one", net)                                  # doctest: +SKIP
        >>> sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)                         # doctest: +SKIP
        >>> module = OnlineKDModule(model, okd, optimizer=sgd)                           # doctest: +SKIP
    """

    def __init__(self, model: LeafModel, okd: OnlineKD, *,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        super().__init__()
        if not isinstance(model, LeafModel):
            raise TypeError(f"model must be a branched model (from branchify.method / branchify.branchify), got "
                            f"{type(model).__name__}")
        if not isinstance(okd, OnlineKD):
            raise TypeError(f"okd must be a branchify.OnlineKD, got {type(okd).__name__}")
        if okd.num_leaves != model.num_leaves:
            raise ValueError(f"okd was built for {okd.num_leaves} leaves but the model has {model.num_leaves}; "
                             f"pass the pair returned by the same branchify.method() call")
        self.model = model
        self.okd = okd
        self.optimizer_fn = optimizer
        self.lr_scheduler_fn = lr_scheduler

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The branched model's output (a :class:`~branchify.BranchedOutput`)."""
        return self.model(*args, **kwargs)

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, labels)`` of a batch (default: a 2-item tuple or list)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"OnlineKDModule expects (inputs, labels) batches, got {type(batch).__name__}"
                        f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; override "
                        f"split_batch(batch) to return (inputs, labels)")

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``step_output(okd(model(x), y))``."""
        x, y = self.split_batch(batch)
        return step_output(self.okd(self.model(x), y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log the target leaf's cross-entropy and accuracy (``val/ce``, ``val/acc``)."""
        x, y = self.split_batch(batch)
        logits = self.model(x).logits[self.model.target]
        self.log("val/ce", nn.functional.cross_entropy(logits.float(), y), sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        """The optimiser (and scheduler) built from the factories given to ``__init__``."""
        if self.optimizer_fn is None:
            raise ValueError("OnlineKDModule has no optimizer: pass optimizer=lambda params: "
                             "torch.optim.SGD(params, lr=0.1) (the model's parameters include the aggregator's)")
        optimizer = self.optimizer_fn(self.model.parameters())
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_fn(optimizer)}
