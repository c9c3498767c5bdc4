"""Numerically stable loss primitives: cross-entropy and temperature-scaled KL divergence.

Everything is computed in float32 (inputs are cast up, so bf16/fp16 logits from autocast are
safe) and with ``log_softmax`` on both sides - no ``+1e-7`` on the teacher, no ``log(0)``.
Token-level outputs (``[B, L, C]`` logits with ``[B, L]`` labels) are supported: positions
whose label is ``ignore_index`` (-100, the PyTorch / Hugging Face convention) are left out and
the loss is averaged over the remaining positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value that marks a position to ignore (padding tokens)."""


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: half precision is widened, float64 stays float64 (for checks)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def valid_mask(labels: torch.Tensor | None, logits: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor | None:
    """Boolean mask over ``logits.shape[:-1]`` of the positions that count, or ``None`` (all count).

    Examples:
        >>> valid_mask(torch.tensor([[1, -100]]), torch.zeros(1, 2, 5))
        tensor([[ True, False]])
    """
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)}; labels must have the logits' shape without the class dim")
    return labels != ignore_index


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions (batchmean for ``[B]``); over real positions when masked; 0 if none."""
    if mask is None:
        return per_position.sum() / max(per_position.numel(), 1)
    per_position = per_position.masked_fill(~mask, 0.0)
    # clamp: an all-padding batch gives 0 (still attached to the graph), not 0/0 = NaN
    return per_position.sum() / mask.sum().clamp_min(1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of ``[B, ..., C]`` logits with ``[B, ...]`` integer labels, in float32.

    Averaged over positions whose label is not ``ignore_index`` (0 when there are none).

    Examples:
        >>> float(cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])))  # log(4)
        1.3862943649291992
    """
    mask = valid_mask(labels, logits, ignore_index)
    logp = F.log_softmax(_wide(logits), dim=-1)
    safe = labels.masked_fill(~mask, 0).long() if mask is not None else labels.long()
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, mask)


def kl_div_log_probs(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(t || s) = sum_c t_c (log t_c - log s_c)`` from log-probabilities, averaged over positions.

    ``t_c = exp(log t_c)`` is exactly 0 only where ``log t_c = -inf``; those entries are
    defined as 0 (the ``0 log 0`` convention) instead of producing NaN.

    Examples:
        >>> lp = torch.log_softmax(torch.randn(3, 5), dim=-1)
        >>> float(kl_div_log_probs(lp, lp))
        0.0
    """
    t_log = _wide(teacher_log_probs)
    s_log = _wide(student_log_probs)
    t = t_log.exp()
    diff = torch.where(t > 0, t_log - s_log, torch.zeros_like(t_log))
    return _masked_mean((t * diff).sum(dim=-1), mask)


def kl_div_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batchmean (or mean over unmasked positions).

    Examples:
        >>> z = torch.randn(4, 10)
        >>> float(kl_div_logits(z, z, T=3.0))
        0.0
    """
    t_log = F.log_softmax(_wide(teacher_logits) / T, dim=-1)
    s_log = F.log_softmax(_wide(student_logits) / T, dim=-1)
    return T * T * kl_div_log_probs(t_log, s_log, mask)


def mixture_log_probs(component_logits: torch.Tensor, log_weights: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``log sum_k w_k softmax(z_k / T)`` for components stacked on dim 0, computed with logsumexp.

    Args:
        component_logits: ``[K, B, ..., C]``.
        log_weights: ``[K]`` or ``[K, B, ...]`` log mixture weights (normalised).

    Examples:
        >>> z = torch.randn(2, 3, 5)
        >>> mix = mixture_log_probs(z, torch.log(torch.tensor([0.5, 0.5])), T=2.0)
        >>> torch.allclose(mix.exp(), torch.softmax(z / 2, -1).mean(0))
        True
    """
    comp = F.log_softmax(_wide(component_logits) / T, dim=-1)
    lw = _wide(log_weights)
    lw = lw.reshape(*lw.shape, *([1] * (comp.dim() - lw.dim())))
    return torch.logsumexp(lw + comp, dim=0)


def kl_div_mixture(component_logits: torch.Tensor, log_weights: torch.Tensor, student_logits: torch.Tensor,
                   T: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(sum_k w_k softmax(z_k/T) || softmax(s/T))`` (a teacher that mixes probabilities).

    Examples:
        >>> z = torch.randn(1, 4, 10).expand(3, 4, 10)
        >>> float(kl_div_mixture(z, torch.log(torch.full((3,), 1 / 3)), z[0], T=3.0)) < 1e-6
        True
    """
    t_log = mixture_log_probs(component_logits, log_weights, T)
    s_log = F.log_softmax(_wide(student_logits) / T, dim=-1)
    return T * T * kl_div_log_probs(t_log, s_log, mask)


def kl_div_probs(teacher_probs: torch.Tensor, student_logits: torch.Tensor, T: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(p || softmax(s/T))`` for a fixed teacher *distribution* ``p`` (e.g. stored soft labels).

    ``p`` must already be softened at the temperature the caller wants; zero entries
    contribute 0 (``xlogy``), so no epsilon is needed.

    Examples:
        >>> z = torch.randn(4, 10)
        >>> float(kl_div_probs(torch.softmax(z / 3, -1), z, T=3.0)) < 1e-6
        True
    """
    p = _wide(teacher_probs)
    s_log = F.log_softmax(_wide(student_logits) / T, dim=-1)
    per_position = (torch.special.xlogy(p, p) - p * s_log).sum(dim=-1)
    return T * T * _masked_mean(per_position, mask)
