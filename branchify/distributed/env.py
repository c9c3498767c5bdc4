"""Process-group helpers: joining the group torchrun set up, the device collectives use, the
rank-major assignment of peers to ranks, and the gather-and-compare checks that make a bad launch
fail on every rank with one message (compare :func:`~branchify.utils.tensor_fingerprint` values to
check tensors)."""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from branchify.errors import BranchifyError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(BranchifyError, RuntimeError):
    """Ranks that disagree (peer count, classes, data, resume epoch) or a bad launch."""


# ---------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ...) are set."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group torchrun set up; returns ``(rank, world_size)``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each rank then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. Already initialised: returns the current group's.

    Examples:
        >>> rank, world = init_from_env()          # under torchrun --nproc_per_node 2   # doctest: +SKIP
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedError(f"not launched by torchrun: {missing} are not set. Start the script with "
                               f"'torchrun --nproc_per_node N -m <module> ...' (or set them yourself)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def comm_device(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assign_peers(num_peers: int, world_size: int, rank: int) -> list[int]:
    """Global indices of the peers rank ``rank`` hosts (contiguous, rank-major).

    ``world_size`` must divide ``num_peers``: every rank hosts the same number of peers.

    Examples:
        >>> assign_peers(4, 2, 1)
        [2, 3]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is outside world size {world_size}")
    if num_peers < 1 or num_peers % world_size:
        hint = (f"run torchrun --nproc_per_node {num_peers} (one peer per rank)" if num_peers >= 1 else
                "give at least one peer")
        divisors = [d for d in range(1, num_peers + 1) if num_peers % d == 0]
        raise DistributedError(f"world size {world_size} does not match the cohort's {num_peers} peers: every rank "
                               f"must host the same number of peers, so the world size must divide {num_peers} "
                               f"(one of {divisors}); {hint}")
    per = num_peers // world_size
    return list(range(rank * per, (rank + 1) * per))


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group).

    Examples:
        >>> gather_objects({"peers": [0]})
        [{'peers': [0]}]
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_same(value: Any, what: str, fix: str, group: Any = None) -> list[Any]:
    """Raise :class:`DistributedError` on every rank unless all ranks hold an equal ``value``.

    Examples:
        >>> check_same(5, "resume epoch", "resume every rank from the same checkpoint")
        [5]
    """
    values = gather_objects(value, group)
    if any(v != values[0] for v in values):
        listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"ranks disagree on the {what} ({listing}); {fix}")
    return values
