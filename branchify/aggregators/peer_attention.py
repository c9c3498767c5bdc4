"""OKDDip's peer attention: every auxiliary peer gets its own attention-weighted target."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets, _model_attr, pool, require_size

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

    What the attention reads: the authors' ``h_a`` is the average-pooled output of peer a's last
    stage, i.e. the input of its final Linear (``out.features``). A model whose classifier is a
    convolution (SqueezeNet's 1x1 conv, timm's DLA) has no such vector; there ``h_a`` is the map
    that convolution reads, average-pooled (``out.feature_maps``, width measured from the conv's
    input channels) - the same quantity one layer earlier in the head. The logits are not used as
    a fallback: they are what the attention mixes, their width is the class count (2 classes would
    leave a 1-d projection), and the authors compare representations, not predictions.

    Numerics: the energies are evaluated from ``q`` and ``k`` scaled by per-sample powers of two
    (exact), their row maximum subtracted before the scale is put back, so ``log alpha`` is the
    same wherever ``q . k`` is finite and stays finite where ``q . k`` itself would overflow (fp16
    from features of a few hundred, fp32 from ~1e19: an eval-mode MNASNet after one step on a batch
    of two, whose BatchNorm running statistics have not moved, see ``_log_attention``).

    Args:
        channels: width of the features the attention reads (bound: ``model.feature_dim``, else
            ``model.feature_map_channels``).
        num_leaves: number of leaves including the leader (``model.num_leaves`` when bound).
        leader: ``"target"`` (default: the model's deployed leaf, ``model.spec.target``), a leaf
            index, or ``None`` for no leader (every leaf is a peer; the authors' ``en`` mode).
        proj_dim: width of the projections (default ``channels // 8``, at least 1).
        space: ``"logits"`` or ``"prob"``, see above.
        detach: default detach rule of the KD terms.

    Examples:
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
        if self.channels is None:  # a conv classifier: its input map, pooled
            self.channels = _model_attr(model, "feature_map_channels")
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
            require_size(self.channels, "the width of out.features (or of out.feature_maps)", "channels",
                         "PeerAttention")
        peers = self.peers(out.num_leaves)
        feats = [out.features[k] for k in peers]
        if any(f is None for f in feats):
            maps = [out.feature_maps[k] for k in peers]
            if any(m is None for m in maps):
                raise AggregatorError("PeerAttention needs the penultimate features of every peer but the "
                                      "model reports neither out.features (no final Linear) nor the map a "
                                      "conv classifier reads; build the branched model with "
                                      "feature_node=<module path> to choose them")
            feats = [pool(m, self.channels) for m in maps]
        h = torch.stack(feats, dim=-2)  # [B, ..., P, C]
        return _log_attention(self.w_l(h), self.w_e(h))

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


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """Per sample (over the last two dims) a power of two ``>= 1`` within a factor 2 of ``max |x|``."""
    peak = x.detach().abs().amax(dim=(-2, -1), keepdim=True)
    _, exponent = torch.frexp(peak)
    return torch.ldexp(torch.ones_like(peak), (exponent - 1).clamp(min=0)).to(x.dtype)


def _log_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``log_softmax_b(q_a . k_b)`` for ``q``, ``k`` of shape ``[..., P, d]``, without forming an
    energy that overflows.

    ``q . k`` is quadratic in the features, so it reaches inf (fp32 from |h| ~ 1e19, fp16 from a
    few hundred) while ``q`` and ``k`` are finite; a row holding +inf and -inf turns into NaN.
    Dividing ``q`` and ``k`` by powers of two is exact, so ``e = (q / s_q) . (k / s_k)`` is the
    energy scaled by ``1 / (s_q s_k)`` with the same rounding; the row maximum is removed in that
    scale and ``s_q s_k`` put back one factor at a time, giving the energies minus their row maximum
    (<= 0; overflow can only reach -inf, i.e. a zero weight). log-softmax is shift-invariant, so the
    result is the authors' ``log softmax(q k^T)`` wherever that is finite.

    Examples:
        >>> q = torch.tensor([[[1e20, 0.0], [0.0, 1e20]]])
        >>> _log_attention(q, q).exp()
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    s_q, s_k = _pow2_scale(q), _pow2_scale(k)
    e = (q / s_q) @ (k / s_k).transpose(-1, -2)
    e = (e - e.amax(dim=-1, keepdim=True).detach()) * s_q * s_k
    return F.log_softmax(e, dim=-1)
