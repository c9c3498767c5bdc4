"""Token-chunked cross-entropy and KD terms: the loss of a vocabulary-sized output without its
full-size temporaries.

A token-level online-KD loss over K leaves of a language model reads K ``[tokens, vocab]``
logits (plus the aggregator's teachers, e.g. ONE's gated logits). Computed as written
(:mod:`branchify.functional`), every cross-entropy and every KD term creates log-softmaxes,
probabilities and products of that size and autograd keeps several of them until the backward:
about ten vocabulary-sized tensors per term. With ONE (3 leaves), 4,096 tokens and a 152k
vocabulary one such tensor is 2.5 GB in float32.

:func:`chunked_terms` computes the same values through one ``torch.autograd.Function``
(:class:`ChunkedTokenLoss`) that walks the positions in chunks of ``chunk`` tokens:

* forward: per chunk, log-softmaxes of the chunk only, reduced at once to per-term sums; nothing
  but the inputs is saved for backward;
* backward: per chunk, the softmaxes are recomputed and the closed-form gradients written into one
  gradient buffer per input - ``dCE/dz = (softmax(z) - onehot(y)) / n``,
  ``d(T^2 KL(p_t||p_s))/ds = T (p_s - p_t) / n`` and, for a teacher that is not detached,
  ``d/dt = T p_t (log p_t - log p_s - KL) / n`` (``n``: positions whose label is not -100, as
  the unchunked mean). So neither pass ever holds more than one chunk's temporaries, and the
  gradients equal those of the unchunked loss (tests compare both in float64).

What stays full-size is what the model itself produces: the leaves' logits, the aggregator's
teacher logits, and their gradients. A teacher that is a weighted sum of the leaves' logits (ONE's
gate) can be handed as a :class:`~branchify.outputs.LinearTeacher` instead: it is then formed chunk by
chunk from the leaves' chunks and its weights, and its gradient is passed on in closed form
(``d/dz_k = w_k dL/dt``, ``d/dw_k = sum_v dL/dt_v z_k,v`` per position), so neither the teacher nor
its gradient exists at full size. Probability-mixture teachers (``KDTerm.teacher_log_weights``) and the
external teacher keep the unchunked path. There are no collectives inside: under DDP each rank
computes its own chunks, exactly as the unchunked loss does.

Examples:
    >>> z = [torch.randn(2, 5, 11, requires_grad=True) for _ in range(2)]
    >>> y = torch.randint(0, 11, (2, 5))
    >>> r = chunked_terms(z, [], [(z[1], z[0], False)], y, temperature=2.0, chunk=3)
    >>> len(r.ce), len(r.kd)
    (2, 1)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .errors import BranchifyError
from .functional import IGNORE_INDEX
from .outputs import LinearTeacher

Logits = Union[torch.Tensor, LinearTeacher]

AUTO_MIN_ELEMENTS = 1 << 25
"""``"auto"`` chunks when positions x vocabulary x distinct logits tensors reach this (32 Mi
elements, 128 MiB per float32 temporary of the unchunked loss). Below it the unchunked loss
costs a few hundred MiB at most and runs faster (one kernel per operation instead of a loop);
see ``benchmarks/lm_memory.py`` for the measurement."""

AUTO_CHUNK_ELEMENTS = 1 << 23
"""Elements of one chunk over all its inputs in ``"auto"`` mode: ``chunk = max(1, 8 Mi // (vocab *
tensors))`` tokens (13 tokens for ONE's 4 tensors at a 152k vocabulary, 65 at 32k). A chunk's
working set is about four such layers of temporaries (log-probabilities, probabilities, the
gradient being accumulated), ~128 MiB in float32 whatever the batch."""


class TokenChunkError(BranchifyError, ValueError):
    """A ``token_chunk`` setting that is not None, ``"auto"`` or a positive int."""


def check_token_chunk(value: int | str | None) -> int | str | None:
    """Validate an ``OnlineKD(token_chunk=...)`` setting and return it.

    Examples:
        >>> check_token_chunk("auto"), check_token_chunk(512), check_token_chunk(None)
        ('auto', 512, None)
    """
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenChunkError(f"token_chunk must be None (never chunk), 'auto' (chunk large token-level "
                              f"outputs) or a positive int (tokens per chunk), got {value!r}")
    return int(value)


def resolve_chunk(setting: int | str | None, labels: torch.Tensor, vocab: int, tensors: int) -> int | None:
    """The chunk size (tokens) to use, or ``None`` for the unchunked loss.

    ``"auto"`` chunks only token-level labels (``[B, L]``, never ``[B]`` classification) when
    ``positions * vocab * tensors >= AUTO_MIN_ELEMENTS``, with
    ``AUTO_CHUNK_ELEMENTS // (vocab * tensors)`` positions per chunk.

    Examples:
        >>> resolve_chunk("auto", torch.zeros(1, 4096, dtype=torch.long), 152064, 4)
        13
        >>> resolve_chunk("auto", torch.zeros(128, dtype=torch.long), 1000, 4) is None
        True
    """
    if setting is None:
        return None
    if setting != "auto":
        return int(setting)
    if labels.dim() < 2 or labels.numel() * vocab * tensors < AUTO_MIN_ELEMENTS:
        return None
    return max(1, AUTO_CHUNK_ELEMENTS // (vocab * tensors))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., L, V]`` as ``[R, L, V]`` (a view for ``[B, L, V]``; ``[B, V]`` becomes ``[1, B, V]``)."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _chunks(rows: int, length: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """``(row0, row1, start, end)`` of every chunk: whole rows grouped when a row fits in ``chunk``
    positions, else at most ``chunk`` positions of one row."""
    if chunk >= length:
        per = chunk // length
        return [(r, min(r + per, rows), 0, length) for r in range(0, rows, per)]
    return [(r, r + 1, s, min(s + chunk, length)) for r in range(rows) for s in range(0, length, chunk)]


def _piece(t: torch.Tensor, c: tuple[int, int, int, int]) -> torch.Tensor:
    """The positions of chunk ``c`` of ``t`` (``[R, L, ...]``), flattened to ``[n, ...]``."""
    return t[c[0]:c[1], c[2]:c[3]].flatten(0, 1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _widened(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mix_grads(slots: list[torch.Tensor], weights: list[torch.Tensor], mixes: tuple[tuple[int, ...], ...],
               grads: list, needs: tuple[bool, ...]) -> None:
    """Hand every linear teacher's chunk gradient ``g`` to its parts (in place in ``grads``):
    ``d/dz_k += w_k g`` and ``d/dw_k = sum_v g_v z_k,v`` per position."""
    n = len(slots) - len(mixes)
    for j, comps in enumerate(mixes):
        g, w = grads[n + j], weights[j]
        if g is None:
            continue
        for k, c in enumerate(comps):
            if needs[c]:
                part = g * w[:, k:k + 1]
                grads[c] = part if grads[c] is None else grads[c] + part
        grads[n + j] = torch.stack([(g * slots[c]).sum(dim=-1) for c in comps], dim=-1) if needs[n + j] else None


def _chunk_pass(pieces: list[torch.Tensor], y: torch.Tensor, m: torch.Tensor, temperature: float,
                plan: tuple, dtype: torch.dtype, gvals: torch.Tensor | None,
                needs: tuple[bool, ...]) -> tuple[torch.Tensor, list]:
    """Per-term sums over one chunk and, when ``gvals`` is given, the chunk's gradients.

    ``pieces``: the chunk ``[n, V]`` of every logits input, then ``[n, K]`` of every linear
    teacher's weights; ``plan``: ``(ce, kd, mixes)`` over slots (the logits inputs, then the
    linear teachers); ``y``/``m``: labels and mask ``[n]``; ``gvals``: d(total)/d(term value)
    already divided by the position count; ``needs``: per input, whether it wants a gradient.
    """
    ce, kd, mixes = plan
    T = temperature
    n = len(pieces) - len(mixes)
    weights = pieces[n:]
    slots = pieces[:n] + [sum(w[:, k:k + 1] * pieces[c] for k, c in enumerate(comps))
                          for comps, w in zip(mixes, weights)]
    if gvals is not None:  # a linear teacher wants a gradient when one of its parts does
        needs = needs[:n] + tuple(needs[n + j] or any(needs[c] for c in comps) for j, comps in enumerate(mixes))
    safe = y.masked_fill(~m, 0).long().unsqueeze(-1)
    plain: dict[int, torch.Tensor] = {}
    soft: dict[int, torch.Tensor] = {}

    def log_probs(i: int, scaled: bool) -> torch.Tensor:
        cache = soft if scaled and T != 1.0 else plain
        if i not in cache:
            z = _wide(slots[i])  # each term in its own inputs' precision, as the unchunked loss
            cache[i] = F.log_softmax(z / T if scaled and T != 1.0 else z, dim=-1)
        return cache[i]

    grads: list[torch.Tensor | None] = [None] * len(slots)

    def add(i: int, g: torch.Tensor) -> None:
        grads[i] = g if grads[i] is None else grads[i] + g

    sums = []
    for t, i in enumerate(ce):
        logp = log_probs(i, False)
        mf = m.to(logp.dtype)
        sums.append(-(logp.gather(-1, safe).squeeze(-1) * mf).sum().to(dtype))
        if gvals is not None and needs[i]:
            g = logp.exp().scatter_add(-1, safe, -torch.ones_like(safe, dtype=logp.dtype))
            add(i, g * (gvals[t] * mf).unsqueeze(-1))
    for j, (ti, si, teacher_grad) in enumerate(kd):
        lt, ls = log_probs(ti, True), log_probs(si, True)
        pt = lt.exp()
        diff = torch.where(pt > 0, lt - ls, torch.zeros_like(lt))
        per = (pt * diff).sum(dim=-1)
        mf = m.to(per.dtype)
        sums.append(T * T * (per * mf).sum().to(dtype))
        if gvals is not None:
            scale = (gvals[len(ce) + j] * T * mf).unsqueeze(-1)
            if needs[si]:
                add(si, (ls.exp() - pt) * scale)
            if teacher_grad and needs[ti]:
                add(ti, pt * (diff - per.unsqueeze(-1)) * scale)
    if gvals is not None:
        _mix_grads(slots, weights, mixes, grads, needs)
    return torch.stack(sums), grads


class ChunkedTokenLoss(torch.autograd.Function):
    """Per-term values ``[n_ce + n_kd]`` of CE and ``T^2 KL`` terms, computed chunk by chunk.

    ``apply(labels, temperature, ce, kd, mixes, chunk, *tensors)``: ``tensors`` are the distinct
    logits ``[..., L, V]`` (same shape), then the weights ``[..., L, K]`` of every linear teacher
    (``mixes[j]``: the indices of its K component logits; its slot is ``len(logits) + j``);
    ``ce`` holds the slot of each cross-entropy; ``kd`` holds ``(teacher slot, student slot,
    teacher receives gradient)`` per KD term. Each value is a mean over the positions whose
    label is not -100 (0 when there are none), as in :mod:`branchify.functional`. Use it
    through :func:`chunked_terms`.

    Examples:
        >>> z = torch.randn(1, 6, 9, requires_grad=True); y = torch.randint(0, 9, (1, 6))
        >>> ChunkedTokenLoss.apply(y, 1.0, (0,), (), (), 4, z).shape
        torch.Size([1])
    """

    @staticmethod
    def forward(ctx, labels, temperature, ce, kd, mixes, chunk, *tensors):  # type: ignore[override]
        views = [_rows(t) for t in tensors]
        rows, length = views[0].shape[0], views[0].shape[1]
        lab = labels.reshape(rows, length)
        mask = lab != IGNORE_INDEX
        dtype = _compute_dtype(tensors)
        count = mask.sum().clamp_min(1)
        total = None
        for c in _chunks(rows, length, chunk):
            sums, _ = _chunk_pass([_piece(v, c) for v in views], _piece(lab, c), _piece(mask, c), temperature,
                                  (ce, kd, mixes), dtype, None, ())
            total = sums if total is None else total + sums
        ctx.save_for_backward(labels, *tensors)
        ctx.setup = (temperature, ce, kd, mixes, chunk)
        return total / count

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        labels, *tensors = ctx.saved_tensors
        temperature, ce, kd, mixes, chunk = ctx.setup
        needs = tuple(ctx.needs_input_grad[6:])
        views = [_rows(t) for t in tensors]
        rows, length = views[0].shape[0], views[0].shape[1]
        lab = labels.reshape(rows, length)
        mask = lab != IGNORE_INDEX
        dtype = _compute_dtype(tensors)
        gvals = grad_values.to(dtype) / mask.sum().clamp_min(1)
        touched = _touched(ce, kd, mixes, needs)
        # contiguous, so that _rows() of a buffer is always a view the chunks write into
        buffers = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if touched[i] else None
                   for i, t in enumerate(tensors)]
        gviews = [_rows(b) if b is not None else None for b in buffers]
        for c in _chunks(rows, length, chunk):
            _, grads = _chunk_pass([_piece(v, c) for v in views], _piece(lab, c), _piece(mask, c), temperature,
                                   (ce, kd, mixes), dtype, gvals, needs)
            for i, g in enumerate(grads[:len(tensors)]):
                if g is not None and touched[i]:
                    target = gviews[i][c[0]:c[1], c[2]:c[3]]  # type: ignore[index]
                    target.copy_(g.reshape(target.shape))
        return (None, None, None, None, None, None, *buffers)


def _touched(ce: tuple[int, ...], kd: tuple[tuple[int, int, bool], ...], mixes: tuple[tuple[int, ...], ...],
             needs: tuple[bool, ...]) -> list[bool]:
    """Which inputs receive a gradient from some term (and need one); a linear teacher that
    receives one passes it to its components and its weights."""
    n = len(needs) - len(mixes)
    hit = [False] * len(needs)  # per slot: the logits inputs, then the linear teachers
    for i in ce:
        hit[i] = True
    for ti, si, teacher_grad in kd:
        hit[si] = True
        hit[ti] = hit[ti] or teacher_grad
    for j, comps in enumerate(mixes):
        if hit[n + j]:
            for c in comps:
                hit[c] = True
    return [h and nd for h, nd in zip(hit, needs)]


@dataclass
class ChunkedTerms:
    """Values of the chunked terms: ``ce[i]`` per cross-entropy, ``kd[j]`` per KD term (0-dim tensors)."""

    ce: list[torch.Tensor]
    kd: list[torch.Tensor]


def _index(distinct: list[torch.Tensor], t: torch.Tensor) -> int:
    for i, u in enumerate(distinct):
        if u is t:
            return i
    distinct.append(t)
    return len(distinct) - 1


def count_distinct(tensors: Sequence[torch.Tensor]) -> int:
    """How many different tensor objects ``tensors`` holds (a DML peer is a student and a teacher).

    Examples:
        >>> z = torch.zeros(2)
        >>> count_distinct([z, z, torch.ones(2)])
        2
    """
    distinct: list[torch.Tensor] = []
    for t in tensors:
        _index(distinct, t)
    return len(distinct)


def chunked_terms(ce_logits: Sequence[torch.Tensor], extra_ce: Sequence[Logits],
                  kd: Sequence[tuple[Logits, Logits, bool]], labels: torch.Tensor, *,
                  temperature: float, chunk: int) -> ChunkedTerms:
    """Cross-entropies of ``ce_logits`` then ``extra_ce``, and ``T^2 KL(teacher || student)`` of
    every ``(teacher, student, detach)`` in ``kd``, computed in chunks of ``chunk`` positions.

    Each value equals its unchunked counterpart (:func:`~branchify.functional.cross_entropy`,
    :func:`~branchify.functional.kl_div_logits` with the ``labels != -100`` mask), and so do the
    gradients; a detached teacher receives none from its term. A tensor used in several roles
    (a DML peer is a student and a teacher) is read once per chunk. A
    :class:`~branchify.outputs.LinearTeacher` (``sum_k w_k z_k``) is formed chunk by chunk from
    its components and weights, which receive its gradients; it is never formed whole.

    Examples:
        >>> z = [torch.randn(1, 7, 5, requires_grad=True) for _ in range(3)]
        >>> t = sum(z) / 3
        >>> r = chunked_terms(z, [t], [(t, zk, True) for zk in z], torch.randint(0, 5, (1, 7)),
        ...                   temperature=3.0, chunk=2)
        >>> [v.dim() for v in r.ce + r.kd] == [0] * 7
        True
    """
    if chunk < 1:
        raise TokenChunkError(f"chunk must be a positive number of tokens, got {chunk}")
    objects: list = []
    ce = [_index(objects, z) for z in [*ce_logits, *extra_ce]]
    kd_plan = [(_index(objects, t), _index(objects, s), not d) for t, s, d in kd]
    distinct: list[torch.Tensor] = []
    mixtures: list[LinearTeacher] = []
    where = []  # per object: its tensor index, or -1 - j for the j-th linear teacher
    for o in objects:
        if isinstance(o, LinearTeacher):
            where.append(-1 - len(mixtures))
            mixtures.append(o)
        else:
            where.append(_index(distinct, o))
    mixes = tuple(tuple(_index(distinct, z) for z in mix.components) for mix in mixtures)
    n = len(distinct)
    slot = [w if w >= 0 else n - 1 - w for w in where]
    shape = distinct[0].shape
    for t in distinct[1:]:
        if t.shape != shape:
            raise TokenChunkError(f"chunked terms need logits of one shape, got {tuple(shape)} and "
                                  f"{tuple(t.shape)}; pass token_chunk=None to compute them unchunked")
    weights = [_mix_weights(mix, shape) for mix in mixtures]
    plan = tuple((slot[t], slot[s], g) for t, s, g in kd_plan)
    ce_slots = tuple(slot[i] for i in ce)
    values = ChunkedTokenLoss.apply(labels, float(temperature), ce_slots, plan, mixes, int(chunk),
                                    *distinct, *weights)
    # Each value in the dtype the unchunked term has (a float32 pair stays float32 next to float64 logits).
    dt = [_wide(t).dtype for t in distinct]
    dt += [_widened(functools.reduce(torch.promote_types, [w.dtype, *(dt[c] for c in comps)]))
           for w, comps in zip(weights, mixes)]
    kd_dt = [torch.promote_types(dt[t], dt[s]) for t, s, _ in plan]
    return ChunkedTerms(ce=[values[i].to(dt[ce_slots[i]]) for i in range(len(ce_slots))],
                        kd=[values[len(ce_slots) + j].to(kd_dt[j]) for j in range(len(plan))])


def _mix_weights(mix: LinearTeacher, shape: torch.Size) -> torch.Tensor:
    """A linear teacher's weights over every position (``[..., L, K]``), their shape checked (the
    components' shapes are, with every other logits')."""
    w = mix.per_position()
    if tuple(w.shape) != (*shape[:-1], len(mix.components)):
        raise TokenChunkError(f"a linear teacher of {len(mix.components)} components of shape {tuple(shape)} "
                              f"needs weights [B, {len(mix.components)}] or {[*shape[:-1], len(mix.components)]}, "
                              f"got {list(mix.weights.shape)}")
    return w
