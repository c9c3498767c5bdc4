"""Stack the tensors of structurally identical replicas into ``[R, ...]`` tensors, and back.

Batched execution (:mod:`branchify.surgery.batched`) needs every parameter and buffer of R
sibling replicas as one tensor with a leading replica dim. The replicas keep their own
``nn.Parameter`` objects (they stay what the optimiser, ``state_dict`` and ``export`` see), so
the stacked tensors are rebuilt at every forward. Two things keep that cheap:

- One concatenation per dtype for *all* tensors of a group (one kernel on a GPU instead of one
  ``torch.stack`` per tensor); each stacked tensor is a view of that flat buffer.
- The backward of a concatenation hands each replica a slice of one gradient buffer with the
  parameter's own layout, so autograd stores it as ``.grad`` without copying.

Each stacked tensor keeps replica 0's memory layout (a ``channels_last`` weight stays
``channels_last`` per replica), so the batched kernels see the same layouts as the loop.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def _physical_order(t: torch.Tensor) -> list[int] | None:
    """Dims of ``t`` from outermost to innermost in memory, or ``None`` if ``t`` is not dense."""
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return perm if t.permute(perm).is_contiguous() else None


def stack_replicas(per_replica: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """``per_replica[k][j]`` is tensor j of replica k; returns one ``[R, ...]`` tensor per j.

    Differentiable: gradients flow back to every replica's tensor.

    Examples:
        >>> a, b = [torch.ones(2, 3), torch.zeros(4)], [2 * torch.ones(2, 3), torch.ones(4)]
        >>> [t.shape for t in stack_replicas([a, b])]
        [torch.Size([2, 2, 3]), torch.Size([2, 4])]
    """
    num = len(per_replica[0])
    out: list[torch.Tensor | None] = [None] * num
    by_kind: dict[tuple, list[tuple[int, list[int] | None]]] = defaultdict(list)
    for j in range(num):
        first = per_replica[0][j]
        perm = None if first.is_contiguous() else _physical_order(first)
        dense = first.is_contiguous() or perm is not None
        same_layout = dense and all(
            r[j].shape == first.shape and r[j].stride() == first.stride() and r[j].dtype == first.dtype
            and r[j].device == first.device for r in per_replica)
        if same_layout:
            by_kind[(first.dtype, first.device)].append((j, perm))
        else:  # unusual layouts (overlapping, mixed strides): a plain stack is always correct
            out[j] = torch.stack([r[j] for r in per_replica])
    reps = len(per_replica)
    for items in by_kind.values():
        # Permutes only for non-default layouts: every extra view is one more op per replica
        # (and one more backward node), which adds up in launch-bound GPU steps.
        pieces = [(r[j] if perm is None else r[j].permute(perm)).view(-1) for j, perm in items for r in per_replica]
        flat = torch.cat(pieces)
        offset = 0
        for j, perm in items:
            first = per_replica[0][j]
            n = first.numel()
            if perm is None:
                out[j] = flat.narrow(0, offset, reps * n).view(reps, *first.shape)
            else:
                physical = [first.shape[d] for d in perm]
                inverse = [perm.index(d) for d in range(first.dim())]
                block = flat.narrow(0, offset, reps * n).view(reps, *physical)
                out[j] = block.permute(0, *[1 + i for i in inverse])
            offset += reps * n
    return out  # type: ignore[return-value]


@torch.no_grad()
def write_back(stacked: list[torch.Tensor], per_replica: list[list[torch.Tensor]]) -> None:
    """Copy ``stacked[j][k]`` into ``per_replica[k][j]`` (buffers updated in place under vmap).

    Examples:
        >>> dst = [[torch.zeros(2)], [torch.zeros(2)]]
        >>> write_back([torch.arange(4.).view(2, 2)], dst); dst[1][0]
        tensor([2., 3.])
    """
    dst = [r[j] for j in range(len(stacked)) for r in per_replica]
    src = [s[k] for s in stacked for k in range(len(per_replica))]
    if dst:
        torch._foreach_copy_(dst, src)
