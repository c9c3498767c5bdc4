"""The recipes' one training loop: the optimiser step sequence every recipe epoch runs through.

:func:`run_epoch` takes the batches of one epoch, asks ``loss_of(x, y)`` for the loss and takes
the step (``zero_grad``, ``backward``, ``step``, the scheduler). What differs between the recipes
is configuration: :func:`branchify.recipes.train.train` (a ``RunConfig``) passes a loss that runs
the forward under autocast, slices each global batch for its DDP rank (``shard=True``) and reads
the loss parts every tenth step; :func:`branchify.recipes.regime.train_run` (the CPU regime)
passes a trainee's loss that refuses a non-finite value, and keeps the last step's loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..distributed import mean_over_ranks, rank_world
from . import ddp

LossOf = Callable[[torch.Tensor, torch.Tensor], Any]
"""``loss_of(x, y)``: a scalar loss tensor, or a loss result with ``.total`` (the tensor to
backpropagate) and ``.parts`` (named scalars to log), which is what a preset's loss returns."""


@dataclass
class EpochStats:
    """What :func:`run_epoch` saw: ``means`` of the logged losses (``"train_loss"`` and every
    part, over the logged steps and, when sharding, every rank), the optimiser ``steps`` taken and
    the ``last_loss`` (the last step's loss tensor, not synchronised; ``None`` if none was taken)."""

    means: dict[str, float]
    steps: int
    last_loss: torch.Tensor | None


def run_epoch(loss_of: LossOf, optimizer: torch.optim.Optimizer, scheduler: Any, loader: Iterable,
              *, steps: int | None = None, bar: Any = None, log_every: int | None = None,
              shard: bool = False) -> EpochStats:
    """Train one epoch: one optimiser step (then one ``scheduler`` step) per batch of ``loader``.

    ``steps``: stop after that many batches (all of them when ``None``). ``bar``: a progress bar
    advanced once per batch. ``log_every``: read the loss and its parts (a device sync) on every
    batch whose index is a multiple of it, and average them into :attr:`EpochStats.means`; never
    when ``None``. ``shard``: each rank of the process group trains on its contiguous slice of the
    global batch, the loss scaled by :func:`branchify.recipes.ddp.shard_batch`'s factor, and the
    logged means are averaged over the ranks (a collective: every rank calls this); a batch
    smaller than the world size is skipped by every rank. Without a process group ``shard`` changes
    nothing. ``scheduler`` may be ``None``.

    Examples:
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> batches = [(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))] * 2
        >>> stats = run_epoch(lambda x, y: torch.nn.functional.cross_entropy(net(x), y), opt, None,
        ...                   batches, log_every=1)
        >>> stats.steps, sorted(stats.means)
        (2, ['train_loss'])
    """
    rank, world = rank_world() if shard else (0, 1)
    sums: dict[str, float] = {}
    logged = taken = 0
    last = None
    for i, (x, y) in enumerate(loader):
        if steps is not None and i >= steps:
            break
        if bar is not None:
            bar.update(1)
        part = ddp.shard_batch(x, y, rank, world)
        if part is None:
            continue
        xs, ys, scale = part
        result = loss_of(xs, ys)
        loss = result if isinstance(result, torch.Tensor) else result.total
        optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1.0 else loss * scale).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        taken, last = taken + 1, loss
        if log_every and i % log_every == 0:
            _add_logged(sums, loss, getattr(result, "parts", None) or {})
            logged += 1
    counts = dict.fromkeys(sums, logged)
    means = mean_over_ranks(sums, counts) if shard else {k: v / counts[k] for k, v in sums.items()}
    return EpochStats(means=means, steps=taken, last_loss=last)


def _add_logged(sums: dict[str, float], loss: torch.Tensor, parts: dict[str, Any]) -> None:
    """Add the loss and its parts to ``sums`` with one device-to-host copy."""
    names = ["train_loss", *sorted(parts)]
    values = [loss.detach()] + [torch.as_tensor(parts[k]) for k in names[1:]]
    for k, v in zip(names, torch.stack([v.float().reshape(()).to(loss.device) for v in values]).tolist()):
        sums[k] = sums.get(k, 0.0) + v
