"""Inputs shared by the token-chunked loss tests (tests/unit/test_token_chunks.py and
tests/unit/test_token_chunks_linear.py): token labels with every kind of ignored position, and float64
leaf logits that require gradients."""
from __future__ import annotations

import torch


def _labels(rows=3, length=7, vocab=11, seed=0):
    """``[rows, length]`` token labels with right padding, a masked prompt and one ignored token (-100)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (rows, length), generator=g)
    y[0, 4:] = -100  # right padding
    y[2, :2] = -100  # a masked prompt
    y[1, 3] = -100   # one ignored token inside a row
    return y


def _leaves(k=3, rows=3, length=7, vocab=11, seed=1):
    """``k`` float64 leaf logits ``[rows, length, vocab]`` that require gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, length, vocab, generator=g, dtype=torch.float64).requires_grad_() for _ in range(k)]
