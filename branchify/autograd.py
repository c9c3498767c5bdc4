"""Autograd helpers used by the tree: gradient rescaling at a cut (CL-ILR's backprop rescaling)."""
from __future__ import annotations

import torch


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, ``scale * grad`` in the backward pass (CL-ILR).

    Examples:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_grad(x, 0.25).sum().backward(); x.grad
        tensor([0.2500, 0.2500])
    """
    if scale == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, scale)
