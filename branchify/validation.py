"""Checks on what users pass to the loss, with messages that say what would be right."""
from __future__ import annotations

import torch

from .functional import IGNORE_INDEX


def check_labels(y: torch.Tensor, logits: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise a ``ValueError`` unless ``y`` holds class indices that fit ``logits``.

    Labels must be an integer tensor (not bool, not float) shaped like ``logits`` without the
    class dim, with values in ``0..C-1`` or ``ignore_index`` (positions to skip). Values are
    checked when ``y`` is on the CPU (reading them from an accelerator would wait for it every
    step; there an out-of-range label fails inside the cross-entropy instead). An empty batch is
    an error: its mean loss is undefined.

    Examples:
        >>> check_labels(torch.tensor([0, 2]), torch.zeros(2, 3))
        >>> check_labels(torch.tensor([0.0, 2.0]), torch.zeros(2, 3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices in an integer tensor (e.g. torch.long), got dtype torch.float32; ...
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels must be a tensor of class indices, got {type(y).__name__}")
    classes = logits.shape[-1]
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be class indices in an integer tensor (e.g. torch.long), got dtype {y.dtype}; "
                         f"soft or one-hot labels are not supported - pass y.argmax(-1) for one-hot labels, "
                         f"or y.long() if the floats are whole class numbers")
    if tuple(y.shape) != tuple(logits.shape[:-1]):
        hint = ("; they look one-hot: pass y.argmax(-1)" if tuple(y.shape) == tuple(logits.shape)
                else "")
        raise ValueError(f"labels of shape {tuple(y.shape)} do not fit logits of shape {tuple(logits.shape)}: "
                         f"labels are class indices with the logits' shape minus the class dim, "
                         f"{tuple(logits.shape[:-1])}{hint}")
    if y.numel() == 0:
        raise ValueError("the batch is empty (0 labels); the mean loss of no samples is undefined - skip empty "
                         "batches in the data loader")
    if y.device.type == "cpu":
        valid = (y >= 0) & (y < classes) | (y == ignore_index)
        if not bool(valid.all()):
            bad = y[~valid].unique()[:5].tolist()
            raise ValueError(f"labels {bad} are out of range for {classes} classes: valid labels are 0..{classes - 1}, "
                             f"or {ignore_index} to ignore a position")
