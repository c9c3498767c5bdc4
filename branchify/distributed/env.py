"""The rank helpers, one family for the whole package: joining the group torchrun set up, this
process's rank and whether it is the main one, the device collectives use, the rank-major
assignment of peers to ranks, the gather-and-compare checks that make a bad launch fail on every
rank with one message (compare :func:`~branchify.utils.tensor_fingerprint` values to check
tensors), means over ranks, and running something on rank 0 only. Without a process group (or
with a group of one rank) each is its single-process meaning, with no collective."""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ..errors import BranchifyError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class DistributedError(BranchifyError, RuntimeError):
    """Ranks that disagree (peer count, classes, data, resume epoch) or a bad launch."""


class RankFailed(BranchifyError, RuntimeError):
    """Raised on the other ranks when rank 0 failed inside :func:`on_main` (its message included)."""


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


# ---------------------------------------------------------------------- rank, main rank, collectives
def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the active process group, ``(0, 1)`` without one.

    Examples:
        >>> rank_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or no process group).

    Examples:
        >>> is_main()
        True
    """
    return rank_world()[0] == 0


def mean_over_ranks(sums: dict[str, Any], counts: dict[str, int],
                    device: torch.device | None = None) -> dict[str, float]:
    """``sum / count`` per key, the sums and counts of every rank added first: the mean over every
    observation of every rank (keys with no observation anywhere are left out).

    A collective when more than one rank runs: every rank must call it (with any keys - ranks that
    saw none of a key contribute zero). ``sums`` hold numbers or scalar tensors. ``device`` is
    where the reduction runs (default: :func:`comm_device`, the current GPU under nccl).

    Examples:
        >>> mean_over_ranks({"ce": torch.tensor(3.0), "kd": 1.0}, {"ce": 2, "kd": 0})
        {'ce': 1.5}
    """
    if not is_distributed():
        return {k: float(v) / counts[k] for k, v in sums.items() if counts.get(k)}
    if device is None:
        device = comm_device()
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted({k for ks in gathered for k in (ks or [])})
    if not keys:
        return {}
    values = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    for i, k in enumerate(keys):
        if k in sums:
            values[i] = torch.as_tensor(sums[k]).detach().to(device=device, dtype=torch.float64)
            values[len(keys) + i] = counts[k]
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    totals, n = values[:len(keys)].tolist(), values[len(keys):].tolist()
    return {k: totals[i] / n[i] for i, k in enumerate(keys) if n[i]}


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group).

    Examples:
        >>> broadcast({"epoch": 3})
        {'epoch': 3}
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result; if it raises, every rank raises.

    Without a process group this is ``fn()``. Errors travel as ``(type name, message)`` and are
    re-raised as :class:`RankFailed` on the other ranks, so no rank waits for a failed one.

    Examples:
        >>> on_main(lambda: 2 + 3)
        5
    """
    if not is_distributed():
        return fn()
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome = [("ok", fn())]
        except Exception as exc:  # noqa: BLE001 - shipped to the other ranks, re-raised below
            dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise RankFailed(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    """Wait for every rank (nothing without a process group).

    Examples:
        >>> barrier()
    """
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group if one was joined.

    Examples:
        >>> shutdown()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
