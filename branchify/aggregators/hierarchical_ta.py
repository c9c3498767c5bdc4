"""AHBF-OKD's hierarchical teacher assistants: leaves fused one by one into a chain of TAs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets, _model_attr, require_size
from .gate import _per_sample


class _Fusion(nn.Module):
    """One AHBF fusion step (the authors' ``AHBF`` module): ``F~ = BN2d(Conv1x1(cat[F~prev, F]))``
    and a 2-way gate ``softmax(ReLU(BN1d(Linear(C -> 2)(GAP F~))))`` whose first weight goes to the
    previous TA and the second to the new leaf, in the authors' argument order."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)
        self.bn_gate = nn.BatchNorm1d(2)

    def forward(self, fused_prev: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.bn(self.conv(torch.cat([fused_prev, feat], dim=1)))
        s = F.softmax(F.relu(self.bn_gate(self.fc(fused.mean(dim=(2, 3))))), dim=1)
        return fused, s


def _fusable(out: BranchedOutput, channels: int | None = None) -> list[torch.Tensor]:
    """The leaves' feature maps ``[B, C, H, W]`` (a channels-last ``[B, H, W, C]`` map, timm's Swin,
    permuted); without them (a ViT, BERT or Llama: no map before the classifier) the features as
    maps: ``[B, C]`` as ``[B, C, 1, 1]`` and token features ``[B, L, C]`` as ``[B, C, L, 1]``, so
    the 1x1 fusion is a per-token linear layer."""
    if out.feature_maps and all(f is not None and f.dim() == 4 for f in out.feature_maps):
        return [f.permute(0, 3, 1, 2) if f.shape[1] != channels and f.shape[-1] == channels else f
                for f in out.feature_maps]
    maps = []
    for m, f in enumerate(out.features or [None] * len(out.logits)):
        if f is None or f.dim() not in (2, 3):
            shape = None if f is None else tuple(f.shape)
            raise AggregatorError(
                f"HierarchicalTA fuses [B, C, H, W] feature maps (or [B, C] / [B, L, C] features) but leaf {m} "
                f"has {shape}; pass feature_node=<module path> to name the features the classifier reads")
        maps.append(f[:, :, None, None] if f.dim() == 2 else f.transpose(1, 2).unsqueeze(-1))
    return maps


class HierarchicalTA(Aggregator):
    """AHBF-OKD (Gong et al. 2023): recursive teacher assistants over the leaves, in leaf order.

    With ``F^m`` the feature map of leaf m before pooling (``out.feature_maps``; a model without
    one - a transformer - fuses its features as 1x1 maps) and leaves
    numbered 0..M-1 (leaf 0 = the target, the shallowest in AHBF's tree):
    ``TA(0) = leaf 0`` (``F~0 = F^0``, ``z_ta(0) = z_0``); for m >= 1
    ``F~m = BN2d(Conv1x1(cat[F~(m-1), F^m]))`` (2C -> C, no ReLU),
    ``s^m = softmax(ReLU(BN1d(Linear(C -> 2)(GAP F~m))))`` and
    ``z_ta(m) = s^m_1 z_ta(m-1) + s^m_2 z_m``.

    Targets, for m >= 1: ``CE(z_ta(m))`` (named ``"ta{m}"``) and
    ``lambda1 * KL(p_ta(m) || p_ta(m-1))`` (``"ta{m-1}<-ta{m}"``: the TA teaches the previous TA),
    ``lambda2 * KL(p_m || p_ta(m-1))`` (``"ta{m-1}<-leaf{m}"``: the deeper branch teaches the
    previous TA) and ``lambda1 * KL(p_ta(m) || p_m)`` (``"leaf{m}<-ta{m}"``: each branch learns from
    its own TA). The loss multiplies each by ``T^2`` and the ramp.

    Paper vs code (``linruigong965/AHBF@ecb8b2c: AHBF-pytorch/train_ahbf.py`` lines 106-120, the
    fusion in ``models/model_backbone/resnet_ahbf.py`` lines 117-155): the last term is in the
    authors' code (lines 114 and 117) but not in the paper's Eq. 11; it is on by default
    (``own_ta=False`` drops it). Default ``(lambda1, lambda2) = (1, 1)``, the code's own argparse
    defaults; the paper's is ``(4, 2)`` (its Table 4) and the README runs ``(2, 4)``. (1, 1) is the
    only one that trained stably at ordinary learning rates and all three reached the same
    accuracy (the measurements are in :mod:`branchify.methods.ahbf`).

    Default detach: ``False`` - the authors' code detaches nothing, and the fusion layers learn
    through the KD terms as well as the TA cross-entropies.

    Args:
        channels: channels of the leaves' feature maps (``model.feature_map_channels``).
        num_leaves: number of leaves M (``model.num_leaves``), at least 2.
        lambdas: ``(lambda1, lambda2)``.
        own_ta: add the authors'-code term ``lambda1 * KL(p_ta(m) || p_m)``.
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> ahbf = HierarchicalTA(channels=8, num_leaves=3)
        >>> out = BranchedOutput([torch.randn(4, 10) for _ in range(3)], [None] * 3,
        ...                      [torch.randn(4, 8, 2, 2) for _ in range(3)])
        >>> sorted(ahbf(out).ce), len(ahbf(out).kd)
        (['ta1', 'ta2'], 6)
    """

    def __init__(self, channels: int | None = None, num_leaves: int | None = None, *,
                 lambdas: tuple[float, float] = (1.0, 1.0), own_ta: bool = True, detach: bool = False) -> None:
        super().__init__(detach=detach)
        if len(tuple(lambdas)) != 2:
            raise AggregatorError(f"HierarchicalTA(lambdas={lambdas!r}) needs two numbers (lambda1, lambda2)")
        self.channels = channels
        self.num_leaves = num_leaves
        self.lambdas = (float(lambdas[0]), float(lambdas[1]))
        self.own_ta = bool(own_ta)
        self.fusions: nn.ModuleList | None = None
        self._build_if_ready()

    def _bind_sizes(self, model) -> None:
        if self.channels is None:
            self.channels = _model_attr(model, "feature_map_channels") or _model_attr(model, "feature_dim")

    def _build_if_ready(self) -> None:
        if self.fusions is None and self.channels is not None and self.num_leaves is not None:
            if self.num_leaves < 2:
                raise AggregatorError(f"HierarchicalTA needs at least 2 leaves, got {self.num_leaves}")
            self.fusions = nn.ModuleList(_Fusion(int(self.channels)) for _ in range(self.num_leaves - 1))

    def forward(self, out: BranchedOutput) -> Targets:
        m_leaves = self._check_leaves(out, minimum=2)
        if self.fusions is None:
            require_size(self.channels, "the channels of out.feature_maps", "channels", "HierarchicalTA")
            require_size(self.num_leaves, "the number of leaves", "num_leaves", "HierarchicalTA")
        maps = _fusable(out, self.channels)
        l1, l2 = self.lambdas
        assert self.fusions is not None
        fused, z_ta = maps[0], out.logits[0]
        kd: list[KDTerm] = []
        ce: dict[str, torch.Tensor] = {}
        for m in range(1, m_leaves):
            z_m = out.logits[m]
            fused, s = self.fusions[m - 1](fused, maps[m])
            z_new = _per_sample(s[:, 0], z_ta) * z_ta + _per_sample(s[:, 1], z_m) * z_m
            ce[f"ta{m}"] = z_new
            kd.append(KDTerm(f"ta{m - 1}<-ta{m}", teacher=z_new, student=z_ta, weight=l1, detach=self.detach))
            kd.append(KDTerm(f"ta{m - 1}<-leaf{m}", teacher=z_m, student=z_ta, weight=l2, detach=self.detach))
            if self.own_ta:
                kd.append(KDTerm(f"leaf{m}<-ta{m}", teacher=z_new, student=z_m, weight=l1, detach=self.detach))
            z_ta = z_new
        return Targets(kd=kd, ce=ce)
