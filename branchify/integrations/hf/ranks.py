"""Loss-part means over every rank of a ``torch.distributed`` run (a no-op in one process).

Examples:
    >>> mean_over_ranks({"loss/kd": torch.tensor(0.4)}, {"loss/kd": 2})   # doctest: +SKIP
    {'loss/kd': 0.2}
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (more than one rank may log).

    Examples:
        >>> distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def mean_over_ranks(sums: dict[str, torch.Tensor], counts: dict[str, int],
                    device: torch.device | None = None) -> dict[str, float]:
    """``sum / count`` per key, each summed over all ranks when ``torch.distributed`` is initialised.

    A collective: under ``torch.distributed`` every rank must call it (with any keys - ranks
    that saw none of a key contribute zero). ``device`` is where the reduction runs (a CUDA
    device for NCCL; default: the tensors' device, else the CPU).

    Examples:
        >>> mean_over_ranks({"ce": torch.tensor(3.0)}, {"ce": 2})
        {'ce': 1.5}
    """
    if not distributed():
        return {k: float(v) / counts[k] for k, v in sums.items() if counts.get(k)}
    if device is None:
        device = next((v.device for v in sums.values()), torch.device("cpu"))
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted({k for ks in gathered for k in (ks or [])})
    if not keys:
        return {}
    values = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    for i, k in enumerate(keys):
        if k in sums:
            values[i] = sums[k].detach().to(device=device, dtype=torch.float64)
            values[len(keys) + i] = counts[k]
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    totals, n = values[:len(keys)].tolist(), values[len(keys):].tolist()
    return {k: totals[i] / n[i] for i, k in enumerate(keys) if n[i]}
