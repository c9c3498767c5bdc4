"""Memory of one training step: the CUDA peak, and (on any device) what autograd saves.

``peak_mb`` (CUDA only): ``torch.cuda.max_memory_allocated`` during the step minus
``memory_allocated`` before it - activations, gradients and temporaries; parameters, optimiser
state and the other variants' models are excluded.

``saved_mb`` (eager variants, any device): the distinct storages autograd saves for backward
during the forward (a ``saved_tensors_hooks`` pack hook). Activations saved for backward are
what a training step's peak is made of, so this compares the forms where no allocator
statistics exist. Why not something else on CPU: torch keeps no CPU allocator statistics,
``tracemalloc`` does not see its buffers, the resident set size hides growth behind glibc's
cached blocks (measured 0-60 MiB of growth for a ResNet-32 step holding ~300 MiB of
activations), and torch's ``MemTracker`` dispatch mode cannot see through vmap's batched
tensors. Compiled graphs save their tensors inside the graph, so ``saved_mb`` is ``None`` there.
"""
from __future__ import annotations

from typing import Callable

import torch


def saved_for_backward_mb(fn: Callable[[], None]) -> float:
    """MiB of distinct storages that autograd saves for backward while ``fn`` runs.

    Example:
        >>> w = torch.randn(256, 256, requires_grad=True)
        >>> round(saved_for_backward_mb(lambda: (w @ w).sum().backward()), 2)
        0.25
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def cuda_peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak extra CUDA memory (MiB) while ``fn`` runs, beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def step_memory(fn: Callable[[], None], device: torch.device, compiled: bool) -> dict[str, float | None]:
    """``{"peak_mb": ..., "saved_mb": ...}`` of one step (``None`` where not measurable)."""
    return {"peak_mb": cuda_peak_mb(fn, device) if device.type == "cuda" else None,
            "saved_mb": None if compiled else saved_for_backward_mb(fn)}
