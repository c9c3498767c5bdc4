"""OKDDip's peer attention: every auxiliary peer gets its own attention-weighted target."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from branchify.aggregators.base import (Aggregator, AggregatorError, KDTerm, Targets, _model_attr,
                                        require_size)
from branchify.outputs import BranchedOutput

SPACES = ("logits", "prob")


class PeerAttention(Aggregator):
    """OKDDip (Chen et al. 2020): two-level distillation with attention-derived peer targets.

    The *leader* is the deployed leaf; every other leaf is an auxiliary *peer*. With ``h_a`` the
    penultimate features of peer a (``out.features``), ``q_a = W_L h_a`` and ``k_b = W_E h_b``
    (``W_L``, ``W_E``: shared ``Linear(C -> C // 8, bias=False)``) and
    ``alpha_ab = softmax_b(q_a . k_b)`` over all peers, self included, without ``sqrt(d)``
    scaling (as in the authors' code):

    - ``space="logits"`` (default, authors' code): peer target logits ``t_a = sum_b alpha_ab z_b``;
      leader target = mean of the peers' logits.
    - ``space="prob"`` (the paper's Eq. 5): peer target distribution
      ``sum_b alpha_ab softmax(z_b / T)``; leader target = mean of the peers' probabilities.
      Expressed as mixture :class:`KDTerm` s, so the loss's temperature is used.

    Default detach: ``False`` as in the authors' code - ``W_L`` and ``W_E`` learn *only*
    through the targets, so detaching them freezes the attention at its init.

    Peers are leaves, so the same aggregator serves branch-based trees and network-based
    cohorts (``split="<input>"``).

    Args:
        channels: width of ``out.features`` (``model.feature_dim`` when bound).
        num_leaves: number of leaves including the leader (``model.num_leaves`` when bound).
        leader: ``"target"`` (default: the model's deployed leaf, ``model.spec.target``), a leaf
            index, or ``None`` for no leader (every leaf is a peer; the authors' ``en`` mode).
        proj_dim: width of the projections (default ``channels // 8``, at least 1).
        space: ``"logits"`` or ``"prob"``, see above.
        detach: default detach rule of the KD terms.

    Example:
        >>> from branchify.outputs import BranchedOutput
        >>> att = PeerAttention(channels=64, num_leaves=4, leader=0)
        >>> out = BranchedOutput([torch.randn(2, 10) for _ in range(4)],
        ...                      [torch.randn(2, 64) for _ in range(4)], [None] * 4)
        >>> [t.name for t in att(out).kd]
        ['leaf1', 'leaf2', 'leaf3', 'leaf0']
    """

    def __init__(self, channels: int | None = None, num_leaves: int | None = None, *,
                 leader: int | Literal["target"] | None = "target", proj_dim: int | None = None,
                 space: Literal["logits", "prob"] = "logits", detach: bool = False) -> None:
        super().__init__(detach=detach)
        if space not in SPACES:
            raise AggregatorError(f"PeerAttention(space={space!r}) is unknown; choose one of {list(SPACES)}")
        if not (leader is None or leader == "target" or (isinstance(leader, int) and leader >= 0)):
            raise AggregatorError(f"PeerAttention(leader={leader!r}): pass 'target', a leaf index, or None")
        self.channels = channels
        self.num_leaves = num_leaves
        self.leader = leader
        self.proj_dim = proj_dim
        self.space = space
        self.w_l: nn.Linear | None = None
        self.w_e: nn.Linear | None = None
        self._build_if_ready()

    def _bind_sizes(self, model) -> None:
        if self.channels is None:
            self.channels = _model_attr(model, "feature_dim")
        if self.leader == "target":
            spec = getattr(model, "spec", None)
            self.leader = int(getattr(spec, "target", 0)) if spec is not None else 0

    def _build_if_ready(self) -> None:
        if self.w_l is None and self.channels is not None:
            c = int(self.channels)
            d = int(self.proj_dim) if self.proj_dim is not None else max(1, c // 8)
            self.proj_dim = d
            self.w_l = nn.Linear(c, d, bias=False)
            self.w_e = nn.Linear(c, d, bias=False)

    def peers(self, num_leaves: int) -> list[int]:
        """Indices of the auxiliary peers (every leaf but the leader)."""
        leader = self._leader_index()
        if leader is not None and not 0 <= leader < num_leaves:
            raise AggregatorError(f"PeerAttention leader={leader} is not a leaf index (0..{num_leaves - 1})")
        return [k for k in range(num_leaves) if k != leader]

    def _leader_index(self) -> int | None:
        if self.leader == "target":
            raise AggregatorError("PeerAttention(leader='target') is not resolved yet: bind it to a "
                                  "branched model (OnlineKD does) or pass leader=<leaf index>")
        return self.leader  # type: ignore[return-value]

    def attention(self, out: BranchedOutput) -> torch.Tensor:
        """Log attention ``log alpha`` of shape ``[B, ..., P, P]`` (row a: how peer a weighs peer b)."""
        if self.w_l is None or self.w_e is None:
            require_size(self.channels, "the width of out.features", "channels", "PeerAttention")
        peers = self.peers(out.num_leaves)
        feats = [out.features[k] for k in peers]
        if any(f is None for f in feats):
            raise AggregatorError("PeerAttention needs the penultimate features of every peer but "
                                  "out.features has None (the model has no final Linear); build the "
                                  "branched model with feature_node=<module path> to choose them")
        h = torch.stack(feats, dim=-2)  # [B, ..., P, C]
        energy = self.w_l(h) @ self.w_e(h).transpose(-1, -2)
        return F.log_softmax(energy, dim=-1)

    def forward(self, out: BranchedOutput) -> Targets:
        k_leaves = self._check_leaves(out)
        peers = self.peers(k_leaves)
        if not peers:
            raise AggregatorError("PeerAttention needs at least one peer besides the leader")
        log_alpha = self.attention(out)
        z = torch.stack([out.logits[k] for k in peers], dim=0)  # [P, B, ..., C]
        kd: list[KDTerm] = []
        for i, a in enumerate(peers):
            if self.space == "logits":
                weights = log_alpha[..., i, :].exp().movedim(-1, 0).unsqueeze(-1)  # [P, B, ..., 1]
                kd.append(KDTerm(f"leaf{a}", teacher=(weights * z).sum(dim=0), student=out.logits[a],
                                 detach=self.detach))
            else:
                kd.append(KDTerm(f"leaf{a}", teacher=z, student=out.logits[a], detach=self.detach,
                                 teacher_log_weights=log_alpha[..., i, :].movedim(-1, 0)))
        leader = self._leader_index()
        if leader is not None:
            if self.space == "logits":
                kd.append(KDTerm(f"leaf{leader}", teacher=z.mean(dim=0), student=out.logits[leader],
                                 detach=self.detach))
            else:
                uniform = torch.full((len(peers),), -math.log(len(peers)), device=z.device, dtype=z.dtype)
                kd.append(KDTerm(f"leaf{leader}", teacher=z, student=out.logits[leader],
                                 detach=self.detach, teacher_log_weights=uniform))
        return Targets(kd=kd, ce={})
