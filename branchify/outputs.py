"""What a branched forward returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BranchedOutput:
    """Per-leaf results of one forward through the branch tree.

    Leaves are in depth-first order, child 0 first (leaf 0 = the all-child-0 path).

    Attributes:
        logits: one ``[B, classes]`` (or ``[B, ..., classes]``) tensor per leaf.
        features: per leaf, the penultimate features (input of the final ``Linear``, after
            skipping a dropout in front of it), or ``None`` when the model has no final Linear.
        feature_maps: per leaf, the feature map before global pooling (``[B, C, H, W]``), or
            ``None`` when the classifier does not pool (AHBF's fusion uses these).
        cuts: tree-node path -> the shared activation entering that node's children
            (``()`` is the trunk output; with a ``"<input>"`` split it is the model input).
            ONE's gate reads ``cuts[()]``.
        leaf_paths: the tree path of every leaf, same order as ``logits``.
    """

    logits: list[torch.Tensor]
    features: list[torch.Tensor | None]
    feature_maps: list[torch.Tensor | None]
    cuts: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    leaf_paths: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def num_leaves(self) -> int:
        return len(self.logits)


def classifier_logits(result: Any) -> torch.Tensor | None:
    """The logits in what a classifier's forward returns: a tensor, an object with ``.logits``
    (Hugging Face outputs), or a tuple/list whose first item is a tensor; ``None`` for anything
    else (callers raise an error that names their context).

    Example:
        >>> classifier_logits((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    return None
