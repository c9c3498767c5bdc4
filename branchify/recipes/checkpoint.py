"""Training checkpoints of the recipes: written atomically at every evaluation, read back safely.

One file per (method, seed), ``<run dir>/checkpoints/<method>-seed<k>.pt``, holding everything
the next epoch depends on, so that a resumed run continues bitwise like an uninterrupted one
(on the CPU):

============== ==============================================================================
key            content
============== ==============================================================================
format         ``"branchify-checkpoint"``; ``version``: :data:`VERSION`
config         the run's :class:`RunConfig` as a JSON string (compared on load)
method, seed   the (method, seed) the file belongs to
epoch          epochs completed (the next epoch's data order is ``TensorLoader.set_epoch(epoch)``)
model          ``model.state_dict()`` of the trained model (the aggregator included)
optimizer      ``optimizer.state_dict()``; ``scheduler``: the LR scheduler's ``state_dict()``
okd            ``OnlineKD.state_dict()`` (the loss's schedule position), ``None`` for the baseline
rng            torch CPU (uint8 tensor), CUDA (list of tensors), Python and NumPy generator states
history        the epoch records so far (JSON string); ``train_seconds``: training time so far
============== ==============================================================================

Only tensors and plain containers are stored, and files are read with
``torch.load(weights_only=True)``, which unpickles nothing else. A file is written to a temporary
name next to it, flushed to disk and renamed over the old one (``os.replace``), so a killed
process leaves either the previous checkpoint or the new one, never half a file.

Examples:
    >>> path = checkpoint_path("runs/fmnist", "one", 0)                     # doctest: +SKIP
    >>> save_checkpoint(path, cfg=cfg, state=state, epoch=3, history=[...], train_seconds=41.0)  # doctest: +SKIP
    >>> ckpt = load_checkpoint(path, cfg)        # CheckpointError if it belongs to another run  # doctest: +SKIP
    >>> restore(ckpt, state)                                                 # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BranchifyError
from .config import RunConfig

FORMAT = "branchify-checkpoint"
VERSION = 1
#: Config fields a resumed run may change: where it runs and where files live, not what it computes.
RESUME_MAY_CHANGE = ("device", "data_root", "out_dir")
_KEYS = ("format", "version", "config", "method", "seed", "epoch", "model", "optimizer", "scheduler", "okd",
         "rng", "history", "train_seconds")


class CheckpointError(BranchifyError, RuntimeError):
    """A checkpoint that cannot be read, is incomplete, or belongs to another run."""


@dataclass
class TrainState:
    """The objects a checkpoint saves and restores (the model unwrapped from any DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    okd: Any = None


def checkpoint_path(run_dir: str | Path, method: str, seed: int) -> Path:
    """Where the checkpoint of (``method``, ``seed``) lives in ``run_dir``.

    Examples:
        >>> checkpoint_path("runs/x", "one", 2).as_posix()
        'runs/x/checkpoints/one-seed2.pt'
    """
    return Path(run_dir) / "checkpoints" / f"{method}-seed{seed}.pt"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8).

    Examples:
        >>> atomic_write_text("/tmp/branchify_doctest.txt", "done")
        >>> open("/tmp/branchify_doctest.txt").read()
        'done'
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def capture_rng() -> dict[str, Any]:
    """Every global generator's state as tensors and lists (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": [version, list(mt), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def restore_rng(state: dict[str, Any]) -> None:
    """Set every global generator back to :func:`capture_rng`'s ``state``."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def config_json(cfg: RunConfig) -> str:
    """The config as the canonical JSON string a checkpoint stores."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def config_differences(stored: dict[str, Any], now: dict[str, Any],
                       ignore: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``"key: old (stored) vs new (now)"`` for every field that differs, ``ignore`` aside.

    Examples:
        >>> config_differences({"epochs": 3, "device": "cpu"}, {"epochs": 5, "device": "cuda"})
        ['epochs: 3 (checkpoint) vs 5 (now)']
    """
    now = json.loads(json.dumps(now, sort_keys=True, default=str))  # the same normal form as stored
    keys = sorted((set(stored) | set(now)) - set(ignore))
    return [f"{k}: {stored.get(k, '<missing>')!r} (checkpoint) vs {now.get(k, '<missing>')!r} (now)"
            for k in keys if stored.get(k) != now.get(k)]


def save_checkpoint(path: str | Path, *, cfg: RunConfig, state: TrainState, epoch: int,
                    history: list[dict[str, Any]], train_seconds: float) -> Path:
    """Write the checkpoint of ``state`` after ``epoch`` completed epochs, atomically.

    Examples:
        >>> save_checkpoint(checkpoint_path(run, "one", 0), cfg=cfg, state=state, epoch=2,   # doctest: +SKIP
        ...                 history=history, train_seconds=12.5)
    """
    import io

    payload = {"format": FORMAT, "version": VERSION, "config": config_json(cfg), "method": cfg.method,
               "seed": cfg.seed, "epoch": int(epoch), "model": state.model.state_dict(),
               "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
               "okd": state.okd.state_dict() if state.okd is not None else None, "rng": capture_rng(),
               "history": json.dumps(history, default=float), "train_seconds": float(train_seconds)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, cfg: RunConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read ``path`` safely and check it belongs to ``cfg``'s run; the payload (see module doc).

    Raises :class:`CheckpointError` naming the file for a truncated or foreign file, missing
    keys, another format version, or a config that differs (other method, seed, epochs, ...).

    Examples:
        >>> ckpt = load_checkpoint("runs/x/checkpoints/one-seed0.pt", cfg)     # doctest: +SKIP
        >>> ckpt["epoch"]                                                      # doctest: +SKIP
        3
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, a pickled object weights_only refuses
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it is "
                              f"truncated or not a branchify checkpoint. Delete it to retrain this (method, seed) "
                              f"from the start, or put back an intact copy") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT!r} file (format "
                              f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; a complete one has {list(_KEYS)}. Delete it to "
                              f"retrain this (method, seed) from the start")
    if payload["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload['version']}, this branchify reads "
                              f"version {VERSION}")
    diffs = config_differences(json.loads(payload["config"]), cfg.to_dict())
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different run: " + "; ".join(diffs)
                              + f". Resume with the run's own settings (only {', '.join(RESUME_MAY_CHANGE)} may "
                              f"change), or train into a fresh --out folder")
    payload["history"] = json.loads(payload["history"])
    return payload


def restore(payload: dict[str, Any], state: TrainState, path: str | Path = "<checkpoint>") -> None:
    """Load a :func:`load_checkpoint` payload into ``state`` (strictly) and the global RNGs.

    Examples:
        >>> restore(load_checkpoint(path, cfg), TrainState(model, opt, sched, okd), path)   # doctest: +SKIP
    """
    try:
        state.model.load_state_dict(payload["model"], strict=True)
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model/optimizer this config builds: "
                              f"{str(exc)[:600]}") from None
    if (payload["okd"] is None) != (state.okd is None):
        raise CheckpointError(f"checkpoint {path} {'has no' if payload['okd'] is None else 'has a'} loss state but "
                              f"this run {'has a' if state.okd is not None else 'has no'} online-KD loss")
    if state.okd is not None:
        state.okd.load_state_dict(payload["okd"])
    restore_rng(payload["rng"])
