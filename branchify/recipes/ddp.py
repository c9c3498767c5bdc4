"""Data-parallel training for the recipes: ``branchify-train --nproc N`` (or torchrun) with DDP.

Two ways to start it, the same run:

    branchify-train --nproc 2 --methods one,dml --fake-data --device cpu --out runs/ddp
    torchrun --standalone --nproc_per_node 2 -m branchify.recipes.cli --methods one,dml --fake-data --out runs/ddp

``--nproc N`` re-launches the CLI under ``python -m torch.distributed.run --standalone
--nproc_per_node N``. Each rank joins the process group (gloo on the CPU, nccl on CUDA with GPU
``LOCAL_RANK``), builds the same model (its aggregator attached by ``bf.method``) and wraps it in
``DistributedDataParallel``.

Data: **identical batches, split by rank**. Every rank draws the same global batch (same seed,
same augmentation) and trains on its contiguous slice ``torch.tensor_split(batch, N)[rank]``;
DDP averages the gradients, and each rank's loss is scaled by ``N * len(slice) / len(batch)``,
so one step equals a single-process step on the whole batch (exactly, up to float summation
order, for models without batch statistics - BatchNorm in train mode normalises per slice; set
``freeze_bn=True`` for exact equality). ``--batch-size`` is the global batch. A last batch with
fewer samples than ranks is skipped. Evaluation, checkpoints, logs and results happen on rank 0
(metrics are broadcast to every rank); logged loss parts are averaged over ranks. Rank, main
rank, ``on_main`` and means over ranks are :mod:`branchify.distributed`'s helpers, as everywhere.

Examples:
    >>> shard_batch(torch.arange(6), torch.arange(6), rank=1, world=2)[0]
    tensor([3, 4, 5])
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import init_from_env, is_distributed, launched_by_torchrun


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each launched rank receives).

    Examples:
        >>> strip_nproc(["--methods", "one", "--nproc", "2", "--fake-data"])
        ['--methods', 'one', '--fake-data']
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_args(argv: list[str], nproc: int) -> list[str]:
    """torchrun's arguments that run the CLI with ``argv`` on ``nproc`` local processes.

    Examples:
        >>> torchrun_args(["--nproc", "2", "--fake-data"], 2)
        ['--standalone', '--nproc_per_node', '2', '-m', 'branchify.recipes.cli', '--fake-data']
    """
    return ["--standalone", "--nproc_per_node", str(nproc), "-m", "branchify.recipes.cli", *strip_nproc(argv)]


def launch(argv: list[str], nproc: int) -> int:
    """Run the CLI on ``nproc`` processes, this process acting as torchrun's agent; the exit code.

    The same as ``python -m torch.distributed.run`` + :func:`torchrun_args` (without a second
    interpreter start). A failed rank stops the others; its exit code is returned.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here to skip its warning
    print(f"launching {nproc} processes: torchrun {' '.join(torchrun_args(argv, nproc)[:5])} ...",
          file=sys.stderr, flush=True)
    try:
        torchrun(torchrun_args(argv, nproc))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        print(f"branchify-train: {len(codes)} of {nproc} processes failed (exit codes {codes}); see their "
              f"messages above", file=sys.stderr, flush=True)
        return next((c for c in codes if c), 1)
    return 0


def setup(device_name: str) -> tuple[int, int]:
    """Join torchrun's process group when launched by it: ``(rank, world)``; ``(0, 1)`` otherwise.

    The backend follows the device: nccl when the run trains on CUDA, gloo on the CPU.
    """
    if not launched_by_torchrun():
        return 0, 1
    cuda = (device_name == "auto" and torch.cuda.is_available()) or device_name.startswith("cuda")
    return init_from_env("nccl" if cuda else "gloo")


def train_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (``LOCAL_RANK``) under nccl, else ``device``."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when a process group is active, else itself.

    The model must already hold its aggregator (``bf.method`` attaches it) so DDP averages the
    aggregator's gradients too; rank 0's parameters and buffers are broadcast to all ranks.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)


def shard_batch(x: torch.Tensor, y: torch.Tensor, rank: int, world: int
                ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """This rank's contiguous slice of the global batch and its loss scale; ``None`` to skip.

    The scale ``world * len(slice) / len(batch)`` makes DDP's gradient average the whole batch's
    mean gradient when slices are unequal; a batch smaller than ``world`` is skipped by all ranks.
    """
    if world == 1:
        return x, y, 1.0
    n = len(y)
    if n < world:
        return None
    xs, ys = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
    return xs, ys, world * len(ys) / n
