"""Weight-space fusion across same-architecture leaves: hybrid-weight models and branch soups.

Every leaf of a branched model is, weight for weight, one copy of the original network (the
trunk and inner nodes it shares with other leaves, plus its own replicas); a
:class:`~branchify.Cohort` of one architecture is the same with nothing shared. So the leaves
can be mixed *in weight space*: ``theta_h = sum_l r_l theta_l`` with convex coefficients ``r``.

- :func:`soup` averages the leaves into one deployable model of the original class ("branch
  soup"; equal coefficients by default).
- :class:`WeightFusion` is OKDPH's hybrid-weight model (Zhang et al., CVPR 2023, official code
  ``tianlizhang/OKDPH@a562089``, ``src/OKDPH.py``): attached to a model, every forward builds the
  hybrid from the current leaves (``update_hwm``, lines 33-47: mean coefficients, or Dirichlet
  ones), runs it on the batch (on its own view, ``views(x, K)``, when the model has views: the
  code's extra transform for the hybrid, line 203) and returns its logits in ``out.hybrid``; on a
  schedule it *fuses back*: every leaf becomes ``gamma * theta_h + (1 - gamma) * theta_l``
  (``fusion``, lines 50-58; every ``k`` epochs, lines 137-141, or every ``k`` batches, lines
  101-103). Mixing covers the whole state dict, BatchNorm statistics included, as the code does
  (``state_dict()`` everywhere); integer buffers (``num_batches_tracked``) are mixed in floating
  point and truncated back, as ``load_state_dict`` does in the code.

Gradients: the code copies the mixture into a separate network (``load_state_dict``, line 46),
so the hybrid's loss reaches no student (``grad=False``, the default: its forward runs without
autograd); ``grad=True`` builds it with :func:`torch.func.functional_call` from the live weights,
so its loss trains every leaf with factor ``r_l`` (the paper's reading).

Examples:
    >>> import torch, branchify as bf
    >>> from torch import nn
    >>> from branchify.fusion import soup
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> bm = bf.branchify(net, bf.Spec(splits=["3"], fanout=[2]))
    >>> avg = soup(bm)                          # the original class, leaves averaged
    >>> bool(torch.allclose(avg[3].weight, (bm.segments["b0"].get_parameter("3.weight")
    ...                                     + bm.segments["b1"].get_parameter("3.weight")) / 2))
    True
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from .contract import LeafModel
from .errors import BranchifyError
from .tree import lineage, segment_key

__all__ = ["FusionError", "coefficients", "fuse_back", "hybrid_state", "leaf_states", "schedule", "soup"]

COEFFICIENTS = ("mean", "dirichlet")
_EXPECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> leaf -> original state keys


class FusionError(BranchifyError, ValueError):
    """Leaves that cannot be mixed in weight space, or a fusion option that cannot work."""


# ---------------------------------------------------------------------- the leaves' weights
def leaf_states(model: LeafModel) -> list[dict[str, torch.Tensor]]:
    """Per leaf, its state under the original model's names, as the *live* tensors (not copies).

    A tensor the leaves share (the trunk) is the same object in every leaf's dict. Raises
    :class:`FusionError` when the leaves differ in names or shapes (e.g. AHBF's deepened leaves).

    Examples:
        >>> states = leaf_states(bm)                                   # doctest: +SKIP
        >>> states[0]["fc.weight"] is bm.segments["b0"].fc.weight      # doctest: +SKIP
        True
    """
    if hasattr(model, "peers"):  # a Cohort: each peer is a whole network
        states = [dict(net.state_dict(keep_vars=True)) for net in model.peers]
    elif hasattr(model, "segments") and hasattr(model, "export_state_dict"):
        states = [_tree_leaf_state(model, i) for i in range(model.num_leaves)]
    else:
        raise FusionError(f"weight fusion needs a BranchedModel or a Cohort, got {type(model).__name__}")
    ref = {k: tuple(v.shape) for k, v in states[0].items()}
    for i, s in enumerate(states[1:], start=1):
        got = {k: tuple(v.shape) for k, v in s.items()}
        if got != ref:
            diff = sorted(set(ref) ^ set(got)) or sorted(k for k in ref if ref[k] != got[k])
            raise FusionError(f"leaf {i} does not have leaf 0's architecture (differs at {diff[:4]}); weight "
                              f"fusion mixes leaves of one architecture (no deepen=, one peer class)")
    return states


def _tree_leaf_state(model: Any, leaf: int) -> dict[str, torch.Tensor]:
    """What ``export_state_dict`` collects for ``leaf``, without copying (live tensors)."""
    path = model.leaf_paths[leaf]
    cached = _EXPECTED.setdefault(model, {})
    if leaf not in cached:  # the original's state_dict keys (building the skeleton is not per-batch work)
        cached[leaf] = list(model._export_skeleton(leaf).state_dict())
    expected = cached[leaf]
    out: dict[str, torch.Tensor] = {}
    for node in lineage(path):
        for k, v in model.segments[segment_key(node)].state_dict(keep_vars=True).items():
            if k in expected and k not in out:
                out[k] = v
    for k, v in model._unexecuted.items():
        out.setdefault(k, v)
    return {k: out[k] for k in expected if k in out}


def coefficients(n: int, kind: str = "mean", generator: torch.Generator | None = None) -> list[float]:
    """Convex coefficients for ``n`` leaves: equal (``"mean"``) or drawn from Dirichlet(1, ..., 1).

    Examples:
        >>> coefficients(4)
        [0.25, 0.25, 0.25, 0.25]
        >>> round(sum(coefficients(3, "dirichlet", torch.Generator().manual_seed(0))), 6)
        1.0
    """
    if kind == "mean":
        return [1.0 / n] * n
    if kind == "dirichlet":  # Dirichlet(1,...,1) = normalised i.i.d. Exp(1) draws
        e = -torch.rand(n, generator=generator, dtype=torch.float64).log()
        return (e / e.sum()).tolist()
    raise FusionError(f"coefficients={kind!r} is unknown; choose 'mean' (the official code's default) or "
                      f"'dirichlet' (random convex weights)")


def hybrid_state(states: Sequence[dict[str, torch.Tensor]], r: Sequence[float],
                 detach: bool = True) -> dict[str, torch.Tensor]:
    """``sum_l r_l * state_l`` per entry, in the official code's order (``update_hwm``: the first
    leaf's ``v * r``, then ``v * r + acc``). A tensor every leaf shares is taken as it is; integer
    entries are mixed in float64 and truncated back to their dtype.

    Examples:
        >>> s = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
        >>> hybrid_state(s, [0.25, 0.75])["w"].tolist()
        [2.5, 5.0]
    """
    if len(r) != len(states):
        raise FusionError(f"{len(r)} coefficients for {len(states)} leaves")
    out: dict[str, torch.Tensor] = {}
    for k, first in states[0].items():
        vals = [s[k].detach() if detach else s[k] for s in states]
        if all(s[k] is first for s in states[1:]):  # shared by every leaf (the trunk)
            out[k] = vals[0]
            continue
        work = [v if v.is_floating_point() else v.double() for v in vals]
        acc = work[0] * r[0]
        for v, c in zip(work[1:], r[1:]):
            acc = v * c + acc
        out[k] = acc if first.is_floating_point() else acc.to(first.dtype)
    return out


@torch.no_grad()
def fuse_back(states: Sequence[dict[str, torch.Tensor]], hybrid: dict[str, torch.Tensor], gamma: float) -> None:
    """Every leaf's tensors become ``hybrid * gamma + leaf * (1 - gamma)`` in place (the official
    code's ``fusion``; ``gamma = 1`` copies the hybrid, ``0`` changes nothing). A tensor shared by
    several leaves is changed once.

    Examples:
        >>> s = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}]
        >>> fuse_back(s, {"w": torch.tensor([2.0])}, 0.5); [x["w"].item() for x in s]
        [1.0, 3.0]
    """
    if not 0.0 <= gamma <= 1.0:
        raise FusionError(f"gamma={gamma} must be in [0, 1] (the share of the hybrid in each fused leaf)")
    if gamma == 0.0:
        return
    done: set[int] = set()
    for s in states:
        for k, t in s.items():
            if id(t) in done or hybrid[k] is t:
                continue
            done.add(id(t))
            if gamma == 1.0:
                t.copy_(hybrid[k])
            else:
                h = hybrid[k] if t.is_floating_point() else hybrid[k].double()
                t.copy_(h * gamma + (t if t.is_floating_point() else t.double()) * (1.0 - gamma))


def soup(model: LeafModel, weights: Sequence[float] | None = None) -> nn.Module:
    """The leaves mixed into one model of the original class (default: their plain average).

    Examples:
        >>> student = soup(bm)                        # doctest: +SKIP
        >>> type(student) is type(original_net)       # doctest: +SKIP
        True
    """
    states = leaf_states(model)
    r = _check_weights(weights, len(states))
    mixed = hybrid_state(states, r)
    deployed = _template(model)
    deployed.load_state_dict({k: v.detach().clone() for k, v in mixed.items()}, strict=True)
    return deployed


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return coefficients(n)
    r = [float(w) for w in weights]
    if len(r) != n or any(w < 0 for w in r) or not math.isclose(sum(r), 1.0, rel_tol=1e-6):
        raise FusionError(f"weights={list(weights)} must be {n} non-negative numbers summing to 1 (one per leaf)")
    return r


def _template(model: LeafModel) -> nn.Module:
    """A module of the original class for the leaves' state (the target leaf's export)."""
    temporal = model._modules.get("temporal")
    deploy = getattr(temporal, "deploy", False)
    if temporal is not None:
        temporal.deploy = False
    try:
        deployed = model.export(model.spec.target)
    finally:
        if temporal is not None:
            temporal.deploy = deploy
    ref = next((t for t in leaf_states(model)[0].values() if t.is_floating_point()), None)
    first = next((t for t in deployed.state_dict().values() if t.is_floating_point()), None)
    if ref is not None and first is not None and first.dtype != ref.dtype:  # e.g. a .double() model
        deployed.to(ref.dtype)
    return deployed


# ---------------------------------------------------------------------- fuse-back schedules
def schedule(every: Any) -> tuple[int, str] | None:
    """``"1_epoch"`` / ``"5_batch"`` (the code's ``--interval``) or ``(k, "epoch")`` as ``(k, level)``;
    ``None`` for none.

    Examples:
        >>> schedule("5_batch"), schedule(None)
        ((5, 'batch'), None)
    """
    if every is None or every == "":
        return None
    if isinstance(every, str):
        gap, _, level = every.partition("_")
        if gap.isdigit() and int(gap) > 0 and level in ("epoch", "batch"):
            return int(gap), level
    elif isinstance(every, tuple) and len(every) == 2 and isinstance(every[0], int) and every[0] > 0 \
            and every[1] in ("epoch", "batch"):
        return every
    raise FusionError(f"fuse_every={every!r} must be like '1_epoch' or '5_batch' (the official code's "
                      f"--interval), or None for no fuse-back")
