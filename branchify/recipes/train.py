"""Train one configuration (a baseline or any online-KD method) and report what was deployed.

The step is deliberately plain - the same few lines a user writes with branchify:
``out = model(x); loss = okd(out, y); loss.total.backward()`` - and it is the recipes' one loop,
:func:`branchify.recipes.loop.run_epoch` (which :func:`branchify.recipes.regime.train_run` runs
too), here with DDP slices, autocast and the loss parts logged. Metrics are computed on the full
test set after each evaluated epoch: the target leaf's accuracy (what ``export()`` deploys),
the ensemble of all leaves, every leaf, and the peers' diversity.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf

from ..distributed import is_main, on_main
from ..export import load_state_dict, read_info, save_deployed
from ..metrics import peer_diversity
from ..utils import autocast
from . import ddp
from .checkpoint import CheckpointError, TrainState, load_checkpoint, restore, save_checkpoint
from .config import RunConfig
from .data import fake_loaders, make_loaders
from .loop import run_epoch
from .progress import progress_bar
from .zoo import build_model


@dataclass
class RunResult:
    config: dict[str, Any]
    target_acc: float
    ensemble_acc: float
    leaf_accs: list[float]
    diversity: float
    deployed_params: int
    trained_params: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    exported_path: str | None = None
    resumed_from_epoch: int = 0  # epochs a checkpoint had done when this run (last) started

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg: RunConfig, num_classes: int, in_channels: int):
    """(trainable model, loss fn or None for the baseline, deployable-model getter)."""
    net = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
    if cfg.method == "baseline":
        return net, None, lambda: net
    args = dict(cfg.method_args)
    args.setdefault("model_fn", lambda: build_model(cfg.model, num_classes=num_classes, in_channels=in_channels))
    model, okd = bf.method(cfg.method, net, **args)
    return model, okd, model.export


def _lr_lambda(cfg: RunConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    marks = [int(m * cfg.epochs) * steps_per_epoch for m in cfg.milestones]
    return lambda step: cfg.gamma ** sum(step >= m for m in marks)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool, target: int,
             limit: int | None = None) -> dict[str, Any]:
    """Accuracy of every leaf, the target, the ensemble, and peer diversity on a whole loader
    (or its first ``limit`` images)."""
    model.eval()
    correct, ens_correct, div_sum, n = None, 0, 0.0, 0
    for x, y in loader:
        if limit is not None and n >= limit:
            break
        x, y = (x, y) if limit is None else (x[: limit - n], y[: limit - n])  # exactly the first `limit` images
        with autocast(device, torch.bfloat16 if amp else None):
            out = model(x)
        logits = [z.float() for z in (out.logits if isinstance(out, bf.BranchedOutput) else [out])]
        hits = torch.stack([(z.argmax(-1) == y).sum() for z in logits])
        correct = hits if correct is None else correct + hits
        probs = torch.stack([z.softmax(-1) for z in logits])
        ens_correct += int((probs.mean(0).argmax(-1) == y).sum())
        if len(logits) > 1:
            div_sum += peer_diversity(logits) * len(y)
        n += len(y)
    leaf = (correct.float() / n * 100).tolist()
    model.train()
    return {"leaf_accs": leaf, "target_acc": leaf[target], "ensemble_acc": ens_correct / n * 100,
            "diversity": div_sum / n}


def train(cfg: RunConfig, *, progress: bool = True, log: Callable[[dict], None] | None = None,
          export_dir: str | Path | None = None, checkpoint: str | Path | None = None,
          resume: bool = False) -> RunResult:
    """Train ``cfg`` and evaluate it; optionally save the exported target with safetensors.

    ``checkpoint``: a file (see :mod:`branchify.recipes.checkpoint`) written atomically after
    every evaluation. If it exists, ``resume=True`` continues from it (bitwise like an
    uninterrupted run on the CPU; a finished run returns at once) and ``resume=False`` raises
    :class:`CheckpointError` rather than overwriting it. Under ``torchrun`` the model trains
    with DDP (see :mod:`branchify.recipes.ddp`); rank 0 evaluates, logs and writes the files.

    Examples:
        >>> res = train(RunConfig(method="one", epochs=1, train_subset=500))   # doctest: +SKIP
        >>> round(res.target_acc, 1)                                            # doctest: +SKIP
        >>> res = train(cfg, checkpoint="runs/x/one.pt", resume=True)          # doctest: +SKIP
    """
    device = ddp.train_device(resolve_device(cfg.device))
    train_loader, test_loader, meta = _loaders(cfg, device)
    torch.manual_seed(cfg.seed)
    model, okd, deployable = build(cfg, meta.num_classes, meta.in_channels)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    target = model.spec.target if okd is not None else 0
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    steps = len(train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    state = TrainState(model, opt, sched, okd)
    start, history, elapsed = _resume(cfg, state, checkpoint, resume, device)
    if start and log is not None and is_main():
        log({"event": "resume", "method": cfg.method, "model": cfg.model, "seed": cfg.seed, "from_epoch": start})
    net = ddp.wrap(model, device)
    bar = progress_bar(cfg.epochs * steps, f"{cfg.method}/{cfg.model}/seed{cfg.seed}", progress and is_main(),
                       leave=False, mininterval=0.1)
    bar.update(start * steps)
    metrics = next((h for h in reversed(history) if "target_acc" in h), None)
    t0 = time.perf_counter() - elapsed
    _set_train(model, cfg.freeze_bn)
    for epoch in range(start, cfg.epochs):
        record = _train_epoch(cfg, net, state, train_loader, epoch, steps, device, bar)
        record["elapsed_s"] = time.perf_counter() - t0
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:
            metrics = on_main(lambda: evaluate(model, test_loader, device, cfg.amp, target, cfg.test_subset))
            _set_train(model, cfg.freeze_bn)
            record.update(metrics)
            bar.set_postfix(acc=f"{metrics['target_acc']:.2f}")
        history.append(record)
        if log is not None and is_main():
            log({"method": cfg.method, "model": cfg.model, "seed": cfg.seed, **record})
        if evaluated and checkpoint is not None and is_main():
            save_checkpoint(checkpoint, cfg=cfg, state=state, epoch=epoch + 1, history=history,
                            train_seconds=time.perf_counter() - t0)
    train_seconds = time.perf_counter() - t0
    bar.close()
    deployed = deployable().eval()
    exported_path = None
    if export_dir is not None and is_main():
        exported_path = str(save_exported(deployed, cfg, meta, export_dir))
    return RunResult(config=cfg.to_dict(), target_acc=metrics["target_acc"], ensemble_acc=metrics["ensemble_acc"],
                     leaf_accs=metrics["leaf_accs"], diversity=metrics["diversity"],
                     deployed_params=sum(p.numel() for p in deployed.parameters()),
                     trained_params=sum(p.numel() for p in model.parameters()),
                     train_seconds=train_seconds, history=history, exported_path=exported_path,
                     resumed_from_epoch=start)


def _loaders(cfg: RunConfig, device: torch.device):
    if cfg.fake_data:
        return fake_loaders(cfg.dataset, cfg.batch_size, cfg.fake_batches, device, cfg.seed,
                            channels_last=cfg.channels_last)
    return make_loaders(cfg.dataset, cfg.batch_size, device, train_subset=cfg.train_subset, seed=cfg.seed,
                        augment=cfg.augment, root=cfg.data_root, eval_batch_size=max(cfg.batch_size, 512),
                        channels_last=cfg.channels_last)


def _resume(cfg: RunConfig, state: TrainState, path: str | Path | None, resume: bool,
            device: torch.device) -> tuple[int, list[dict[str, Any]], float]:
    """(epochs done, history, seconds trained) from ``path`` if resuming, else a fresh start."""
    if path is None or not Path(path).exists():
        return 0, [], 0.0
    if not resume:
        raise CheckpointError(f"checkpoint {path} already exists; pass resume=True (branchify-train --resume "
                              f"<run dir>) to continue it, or train into a fresh directory")
    payload = load_checkpoint(path, cfg, device)
    restore(payload, state, path)
    return int(payload["epoch"]), list(payload["history"]), float(payload["train_seconds"])


def _set_train(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` every BatchNorm stays in eval mode (running statistics)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _train_epoch(cfg: RunConfig, net: nn.Module, state: TrainState, loader, epoch: int, steps: int,
                 device: torch.device, bar) -> dict[str, Any]:
    """One epoch of :func:`~branchify.recipes.loop.run_epoch` on this rank's slices of the batches
    (the forward under autocast, the loss parts read every 10th step); the epoch's log record
    (rank-averaged)."""
    okd = state.okd
    if okd is not None:
        okd.set_epoch(epoch, cfg.epochs)
    loader.set_epoch(epoch)

    def loss_of(x: torch.Tensor, y: torch.Tensor):
        with autocast(device, torch.bfloat16 if cfg.amp else None):
            out = net(x)
        return okd(out, y) if okd is not None else F.cross_entropy(out.float(), y)

    means = run_epoch(loss_of, state.optimizer, state.scheduler, loader, steps=steps, bar=bar, log_every=10,
                      shard=True).means
    record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": means.pop("train_loss", 0.0),
                              "lr": state.scheduler.get_last_lr()[0]}
    if means:
        record["loss_parts"] = means
    return record


def save_exported(model: nn.Module, cfg: RunConfig, meta, directory: str | Path) -> Path:
    """Save the deployed model as ``model.safetensors`` + ``branchify.json`` (:mod:`branchify.export`'s
    schema, plus how to rebuild it: the zoo ``model``, ``num_classes``, ``in_channels``, ``method``)."""
    return save_deployed(model, directory, format="safetensors",
                         extra={"model": cfg.model, "num_classes": meta.num_classes,
                                "in_channels": meta.in_channels, "method": cfg.method})


def load_exported(directory: str | Path) -> nn.Module:
    """Rebuild the original model class and load the saved target strictly.

    Examples:
        >>> net = load_exported("runs/demo/exported")     # doctest: +SKIP
    """
    info = read_info(directory)  # also the model.json of runs saved before branchify.json
    net = build_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"])
    net.load_state_dict(load_state_dict(directory, info), strict=True)
    return net.eval()
