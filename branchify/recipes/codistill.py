"""One codistillation group's training loop for ``branchify-train --codistill G`` (see
:mod:`branchify.recipes.codistill_cli` for the launch, :mod:`branchify.distributed.codistill`
for the method).

Group ``g`` builds its model with ``torch.manual_seed(seed + g)`` (architecture
``method_args.models[g]``, default ``--model``), draws its batches from the run's training set
in its own order (loader seed :func:`group_seed`), trains data parallel on its ``D`` ranks (DDP
on the group's ``"dp"`` process group; the global batch ``--batch-size`` is split across them as
in :mod:`branchify.recipes.ddp`), and exchanges with the other groups every ``K`` steps. Data
parallel rank 0 evaluates, logs (``log.jsonl``: epoch records with the group, the teacher count
and the bytes), checkpoints (``checkpoints/codistill-g<g>.pt``, resumable) and exports
(``exported/group<g>/``).

Examples:
    >>> group_seed(0, 1)
    7919
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.codistill import CodistillOptions, CodistillPeer, allreduce_bytes, exchange_due
from ..distributed.env import comm_device
from . import codistill_fsdp as fsdp
from . import ddp
from .checkpoint import TrainState, save_checkpoint
from .config import RunConfig
from .train import _loaders, _lr_lambda, _resume, _set_train, evaluate, save_exported
from .zoo import build_model

#: method_args keys the codistillation recipe reads besides :class:`CodistillOptions` fields.
EXTRA_KEYS = ("models", "via", "parallel")


def group_seed(seed: int, group: int) -> int:
    """The loader seed of group ``group`` (its batch order and augmentation); group 0 keeps ``seed``."""
    return seed + 7919 * group


def options_of(cfg: RunConfig) -> CodistillOptions:
    """The :class:`CodistillOptions` stored in ``cfg.method_args`` (unknown keys are an error)."""
    from dataclasses import fields

    from ..distributed.codistill import CodistillError

    names = {f.name for f in fields(CodistillOptions)}
    unknown = sorted(set(cfg.method_args) - names - set(EXTRA_KEYS))
    if unknown:
        raise CodistillError(f"unknown codistillation option(s) {unknown} in --set method_args.*; valid: "
                             f"{sorted(names | set(EXTRA_KEYS))}")
    return CodistillOptions(**{k: v for k, v in cfg.method_args.items() if k in names})


def models_of(cfg: RunConfig, groups: int) -> list[str]:
    """Each group's architecture: ``method_args.models`` (one name per group) or ``cfg.model``."""
    from ..distributed.codistill import CodistillError

    models = cfg.method_args.get("models") or [cfg.model] * groups
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",")]
    if len(models) != groups:
        raise CodistillError(f"method_args.models names {len(models)} architectures ({models}) for {groups} "
                             f"groups; give one per group, e.g. --set method_args.models=[resnet20,vgg16]")
    return list(models)


def fingerprint(cfg: RunConfig) -> str:
    """A short hash of the run's config (device and paths aside): equal in every group of a run."""
    from .checkpoint import RESUME_MAY_CHANGE

    d = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class GroupContext:
    """Where a group runs: its index, its data-parallel process group, its transport."""

    group: int
    dp_group: Any
    transport: Any
    say: Callable[[str], None] = print
    dp_mesh: Any = None  # the group's 1-D "dp" DeviceMesh (FSDP2 shards over it)
    lockstep: bool = False  # all groups in one job (collective transport): they must resume together

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group) if self.dp_group is not None else 0

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group) if self.dp_group is not None else 1


def _wrap(model: nn.Module, ctx: GroupContext, device: torch.device) -> nn.Module:
    if ctx.dp_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, process_group=ctx.dp_group)


def _check_same_start(start: int, group: int) -> None:
    """Groups that exchange through collectives must resume from the same epoch: otherwise one
    group would finish while the others still wait in its collectives. Fails on every rank."""
    from ..distributed.codistill import CodistillError
    from ..distributed.env import gather_objects

    starts = gather_objects((group, start))
    if len({s for _, s in starts}) > 1:
        where = ", ".join(f"group {g}: epoch {s}" for g, s in sorted(set(starts)))
        raise CodistillError(f"the groups' checkpoints are at different epochs ({where}); a via=collective run "
                             f"resumes all groups together from one epoch. Use via=files, where each group "
                             f"resumes on its own, or train into a fresh --out")


def _gathered(state: TrainState) -> TrainState:
    """The whole model and optimizer state of a sharded group, gathered on every rank (to save)."""
    return TrainState(fsdp.Gathered(state.model.state_dict()), fsdp.Gathered(state.optimizer.state_dict()),
                      state.scheduler, None)


def _shared_loader(loader, options: CodistillOptions, seed: int):
    """The shared micro-batch stream: the same training images in every group (logits mode)."""
    shared = copy.copy(loader)
    shared.batch_size = options.shared_batch
    shared.seed = seed + 104729
    shared._generator = torch.Generator(device=loader.device)
    return shared


def train_group(cfg: RunConfig, out: Path, ctx: GroupContext, *, resume: bool,
                log: Callable[[dict], None]) -> dict[str, Any]:
    """Train group ``ctx.group`` to the end; its result record (rank 0's is complete)."""
    options = options_of(cfg)
    models = models_of(cfg, options.groups)
    g, main = ctx.group, ctx.dp_rank == 0
    device = ddp.train_device(torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                           else "cpu" if cfg.device == "auto" else cfg.device))
    train_loader, test_loader, meta = _loaders(cfg, device)
    shared = _shared_loader(train_loader, options, cfg.seed) if options.exchange == "logits" else None
    train_loader.seed = group_seed(cfg.seed, g)

    def build(h: int) -> nn.Module:
        return build_model(models[h], num_classes=meta.num_classes, in_channels=meta.in_channels)

    torch.manual_seed(cfg.seed + g)
    model = build(g).to(device)
    sharded = cfg.method_args.get("parallel", "ddp") == "fsdp2" and ctx.dp_size > 1
    if sharded:
        fsdp.shard(model, ctx.dp_mesh)  # before the optimizer, which then holds the shards
    peer = CodistillPeer(model, g, options, build)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    steps = len(train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    state = TrainState(model, opt, sched, None)
    io_state = state  # what checkpoints read and write; sharded: whole tensors, loaded into / gathered from shards
    if sharded:
        io_state = TrainState(fsdp.ShardedState(model), fsdp.ShardedState(model, opt), sched, None)
    ckpt = out / "checkpoints" / f"codistill-g{g}.pt"
    start, history, elapsed = _resume(cfg, io_state, ckpt, resume, device)
    if ctx.lockstep:
        _check_same_start(start, g)
    if start and main:
        ctx.say(f"group {g} resumes after epoch {start}")
        log({"event": "resume", "group": g, "from_epoch": start})
    net = model if sharded else _wrap(model, ctx, device)
    ar = allreduce_bytes(model, ctx.dp_size)
    t0 = time.perf_counter() - elapsed
    metrics = next((h for h in reversed(history) if "target_acc" in h), None)
    due = exchange_due(start * steps, options) or start * steps < options.burn_in
    if start and start < cfg.epochs and not due:
        peer.absorb(ctx.transport.collect(start * steps))  # rejoin: the peers' newest snapshots now
    _set_train(model, cfg.freeze_bn)
    for epoch in range(start, cfg.epochs):
        record = _epoch(cfg, options, net, peer, state, ctx, train_loader, shared, epoch, steps)
        record.update({"group": g, "model": models[g], "elapsed_s": time.perf_counter() - t0,
                       "bytes/in_group_allreduce_per_step": ar["ring_bytes_per_rank"],
                       "bytes/cross_group_sent": ctx.transport.sent,
                       "bytes/cross_group_received": ctx.transport.received})
        if (main or sharded) and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = evaluate(model, test_loader, device, cfg.amp, 0, cfg.test_subset)  # sharded: every rank
            _set_train(model, cfg.freeze_bn)
            record.update(metrics)
        history.append(record)
        saved = _gathered(io_state) if sharded else state
        if main:
            log({"method": "codistill", **record})
            save_checkpoint(ckpt, cfg=cfg, state=saved, epoch=epoch + 1, history=history,
                            train_seconds=time.perf_counter() - t0)
    if options.exchange == "weights":  # finished: its final weights keep teaching the others
        ctx.transport.publish(cfg.epochs * steps, peer.snapshot(), final=True)
    result = {"group": g, "model": models[g], "epochs": cfg.epochs, "steps_per_epoch": steps,
              "resumed_from_epoch": start, "teachers_at_end": peer.live, "train_seconds": time.perf_counter() - t0,
              "history": history, "allreduce": ar, **(metrics or {})}
    whole = fsdp.full_model_state(model) if sharded else None
    if main:
        deployed = model if whole is None else build(g)
        if whole is not None:
            deployed.load_state_dict(whole, strict=True)
        result["exported_path"] = str(save_exported(deployed.eval(), cfg.replace(model=models[g]), meta,
                                                    out / "exported" / f"group{g}"))
        ctx.say(f"group {g} finished: {cfg.epochs} epochs, accuracy {result.get('target_acc', float('nan')):.2f}%, "
                f"teachers at the end {peer.live} of {[h for h in range(options.groups) if h != g]}")
    return result


def _epoch(cfg: RunConfig, options: CodistillOptions, net: nn.Module, peer: CodistillPeer, state: TrainState,
           ctx: GroupContext, loader, shared, epoch: int, steps: int) -> dict[str, Any]:
    opt, sched = state.optimizer, state.scheduler
    loader.set_epoch(epoch)
    shared_iter = None
    if shared is not None:
        shared.set_epoch(epoch)
        shared_iter = iter(shared)
    sums = {"train_loss": 0.0, "ce": 0.0, "kd": 0.0, "teachers": 0.0}
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        step = epoch * steps + i
        part = ddp.shard_batch(x, y, ctx.dp_rank, ctx.dp_size)
        if part is None:
            continue
        xs, ys, scale = part
        kd_x, kd_logits = xs, None
        if shared_iter is not None:
            sx, _ = next(shared_iter, None) or next(iter(shared))
            kd_x = torch.tensor_split(sx, ctx.dp_size)[ctx.dp_rank]
            both = net(torch.cat([xs, kd_x]))
            logits, kd_logits = both[: len(xs)], both[len(xs):]
        if exchange_due(step, options):
            if shared_iter is None:
                ctx.transport.publish(step, peer.snapshot())
            else:
                ctx.transport.publish(step, peer.snapshot(kd_logits, kd_x))
            peer.absorb(ctx.transport.collect(step))
        if shared_iter is None:
            logits = net(xs)
        loss, parts = peer.loss(logits, ys, kd_x, kd_logits)
        opt.zero_grad(set_to_none=True)
        (loss if scale == 1.0 else loss * scale).backward()
        opt.step()
        sched.step()
        for k, v in {"train_loss": float(loss.detach()), **parts}.items():
            sums[k] += v
        seen += 1
    means = _dp_mean({k: v / max(seen, 1) for k, v in sums.items()}, ctx)
    return {"epoch": epoch + 1, "train_loss": means.pop("train_loss"), "lr": sched.get_last_lr()[0],
            "loss_parts": means}


def _dp_mean(values: dict[str, float], ctx: GroupContext) -> dict[str, float]:
    if ctx.dp_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device(ctx.dp_group))
    dist.all_reduce(t, group=ctx.dp_group)
    return dict(zip(keys, (t / ctx.dp_size).tolist()))
