"""Batched replicas: sibling segments that share their structure run as one vmapped call.

This module plans the groups and runs one group; :mod:`branchify.surgery.runner` walks the tree.

A level of the tree holds R replicas of one template segment. When they are structurally
identical (same graph, same parameter shapes; deepened leaves are not), their forward is one
``torch.vmap`` over ``torch.func.functional_call(template, stacked_params, ...)``: convolutions
become one wide or grouped convolution, every elementwise op runs once instead of R times.

Storage does not change. Every replica keeps its own ``nn.Parameter`` objects and buffers in
``BranchedModel.segments``; at each forward they are stacked into ``[R, ...]`` tensors
(:mod:`branchify.surgery.stacking`: one concatenation, gradients come back without a copy) and
BatchNorm's running statistics are written back after the call. So ``parameters()``,
``state_dict()`` (keys and shapes), optimisers and their per-tensor semantics (weight-decay
groups by name, module type or ``ndim``, LARS/LAMB trust ratios), ``export()``, ``describe()``,
DDP and checkpoints are the same whether a model runs batched or as a loop, and the execution
strategy can be switched at any time (``model.batched = ...``).

The vmapped call runs a copy of the first replica's GraphModule that shares its modules, except
that plain BatchNorms run through :mod:`branchify.surgery.vmap_batchnorm` (one fused kernel over
all replicas instead of vmap's normalise-then-affine, which keeps an extra activation per
BatchNorm). Forward hooks registered on a replica's modules do not fire in a batched call; set
``model.batched = False`` to use them. With ``batched="auto"``, a group that vmap cannot run
(data-dependent Python in a leaf module, ``.item()``) warns once and runs on the loop from then
on; with ``batched=True`` that is an error.

Groups: at each level, when every parent has the same number of children C and all R = P * C
replicas share one structure, the level is one group run as a nested vmap (outer over the P
parents, whose activations are already stacked when the parent level ran batched; inner over
the C children, which read their parent's activation unbatched). Otherwise each parent's
children are grouped by structure; groups of one replica, and deepened leaves that match no
sibling, run on the loop.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..autograd import scale_grad
from ..errors import BranchifyError
from ..tree import TreePath, segment_key
from .stacking import stack_replicas, write_back
from .vmap_batchnorm import vmap_template

if TYPE_CHECKING:
    from ..spec import Spec

BatchedMode = Union[bool, str]
"""``True`` (always vmap), ``False`` (always the loop) or ``"auto"`` (vmap on CUDA, loop elsewhere)."""

AUTO_DEVICES = ("cuda",)
"""Device types on which ``batched="auto"`` runs groups batched. On CPU the vmapped (grouped)
convolutions measured no faster than the loop (``benchmarks/speed.py``), so CPU keeps the loop."""


class NotBatchable(BranchifyError, RuntimeError):
    """A group cannot run batched in this call (``permanent`` if it never will)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def check_mode(value: Any) -> BatchedMode:
    """Validate a ``batched=`` value.

    Examples:
        >>> check_mode("auto"), check_mode(False)
        ('auto', False)
    """
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"batched={value!r}: pass True (sibling replicas always run as one vmapped call), "
                     f"False (always one call per replica) or 'auto' (batched on {list(AUTO_DEVICES)})")


def wants_vmap(mode: BatchedMode, device: torch.device | None) -> bool:
    """Whether a forward on ``device`` runs its groups batched under ``mode``."""
    if mode is True:
        return True
    return mode == "auto" and device is not None and device.type in AUTO_DEVICES


# ---------------------------------------------------------------------- the plan
@dataclass(eq=False)
class ReplicaGroup:
    """Sibling replicas of one level that run as one batched call.

    Attributes:
        level: tree level (>= 1).
        parents: the P parent nodes, in order.
        fanout: children per parent (C); ``members`` has P * C paths, parent-major.
        members: the replicas' tree paths.
        param_names / buffer_names: the template's tensors, in stacking order.
        disabled: why the group now runs on the loop (set when ``batched="auto"`` found that
            vmap cannot run it), else ``None``.
    """

    level: int
    parents: list[TreePath]
    fanout: int
    members: list[TreePath]
    param_names: list[str]
    buffer_names: list[str]
    disabled: str | None = None
    # Module references, built with the plan (not inside a compiled call, where building the
    # vmap template cannot be traced); deepcopy and pickle map them to the copied modules.
    _cache: Any = field(default=None, repr=False, compare=False)


@dataclass
class BatchPlan:
    """Per replicated level (index 0 = level 1): groups and single replicas (loop)."""

    levels: list[list[ReplicaGroup | TreePath]]

    @property
    def groups(self) -> list[ReplicaGroup]:
        return [u for units in self.levels for u in units if isinstance(u, ReplicaGroup)]


def _signature(gm: fx.GraphModule) -> tuple:
    """What must match for two replicas to share one vmapped template."""
    return (gm.code,
            tuple((n, type(m).__qualname__) for n, m in gm.named_modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in gm.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in gm.named_buffers()))


def plan_groups(spec: "Spec", segments: dict[str, fx.GraphModule] | nn.ModuleDict) -> BatchPlan:
    """Group every level's replicas into batchable sets (see the module docstring)."""
    levels: list[list[ReplicaGroup | TreePath]] = []
    by_level: dict[int, list[TreePath]] = {}
    for node in spec.nodes():
        if node.level:
            by_level.setdefault(node.level, []).append(node.path)
    for level, paths in by_level.items():
        sig = {p: _signature(segments[segment_key(p)]) for p in paths}
        by_parent: dict[TreePath, list[TreePath]] = {}
        for p in paths:
            by_parent.setdefault(p[:-1], []).append(p)
        counts = {len(c) for c in by_parent.values()}
        if len(paths) >= 2 and len(counts) == 1 and len(set(sig.values())) == 1:
            buckets = [(list(by_parent), counts.pop(), paths)]
        else:
            buckets = []
            for parent, children in by_parent.items():
                same: dict[tuple, list[TreePath]] = {}
                for c in children:
                    same.setdefault(sig[c], []).append(c)
                buckets.extend(([parent], len(m), m) for m in same.values())
        units: list[ReplicaGroup | TreePath] = []
        for parents, fanout, members in buckets:
            if len(members) < 2:
                units.append(members[0])
                continue
            template = segments[segment_key(members[0])]
            group = ReplicaGroup(level, parents, fanout, list(members),
                                 [n for n, _ in template.named_parameters()],
                                 [n for n, _ in template.named_buffers()])
            _slots(group, [segments[segment_key(p)] for p in members])
            units.append(group)
        levels.append(units)
    return BatchPlan(levels)


# ---------------------------------------------------------------------- running a tree
def _slot(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class _Slots:
    """Where each replica's tensors live (``(module, attribute)``), so a forward reads them with
    one ``getattr`` each instead of walking the module tree."""

    def __init__(self, segs: list[nn.Module], group: ReplicaGroup) -> None:
        self.segments = segs
        self.params = [[_slot(s, n) for n in group.param_names] for s in segs]
        self.buffers = [[_slot(s, n) for n in group.buffer_names] for s in segs]
        self.batchnorms = [(n, m) for n, m in segs[0].named_modules() if isinstance(m, _BatchNorm)]
        self.vmap_template = vmap_template(segs[0])  # BatchNorms as one fused kernel per group


def _slots(group: ReplicaGroup, segs: list[nn.Module]) -> _Slots:
    cache = group._cache
    if cache is None or any(a is not b for a, b in zip(cache.segments, segs)):
        cache = group._cache = _Slots(segs, group)
    return cache


def _over_parents(values: list[torch.Tensor], origin: dict[int, tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``values`` (one per parent) as one ``[P, ...]`` tensor: the parent level's stacked output
    when they are consecutive slices of it (no copy), else a stack."""
    src = [origin.get(id(v)) for v in values]
    if all(s is not None for s in src):
        base = src[0][0]  # type: ignore[index]
        idx = [s[1] for s in src]  # type: ignore[index]
        if all(s[0] is base for s in src) and idx == list(range(idx[0], idx[0] + len(idx))):  # type: ignore[index]
            return base if idx[0] == 0 and len(idx) == base.shape[0] else base.narrow(0, idx[0], len(idx))
    return torch.stack(values)


@contextmanager
def _cumulative_momentum(slots: _Slots, buffers: dict[str, torch.Tensor]) -> Iterator[None]:
    """BatchNorm with ``momentum=None`` keeps a cumulative average whose factor it reads with
    ``float(num_batches_tracked)`` - impossible under vmap. The factor is the same for all
    replicas when their counters agree, so it is set as an explicit momentum for this call."""
    changed = []
    try:
        for name, m in slots.batchnorms:
            if m.momentum is not None or not (m.training and m.track_running_stats):
                continue
            nbt = buffers.get(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
            if nbt is None:
                continue
            counts = set(nbt.flatten().tolist())
            if len(counts) != 1:
                raise NotBatchable(f"BatchNorm {name!r} has momentum=None and its replicas have seen "
                                   f"different numbers of batches {sorted(counts)}")
            m.momentum = 1.0 / (counts.pop() + 1)  # BN increments the counter, then averages
            changed.append(m)
        yield
    finally:
        for m in changed:
            m.momentum = None


def group_forward(segments: nn.ModuleDict, group: ReplicaGroup, envs: dict[TreePath, dict[str, Any]],
                  origin: dict[int, tuple[torch.Tensor, int]], names: list[str],
                  scale: float) -> dict[str, torch.Tensor]:
    """One vmapped call for all replicas of ``group``: their outputs stacked ``[R, ...]``."""
    segs = [segments[segment_key(p)] for p in group.members]
    template = segs[0]
    if any(s.training != template.training for s in segs):
        raise NotBatchable("replicas are in different train/eval modes", permanent=False)
    slots = _slots(group, segs)
    params = stack_replicas([[getattr(m, a) for m, a in row] for row in slots.params])
    buffers = stack_replicas([[getattr(m, a) for m, a in row] for row in slots.buffers]) if group.buffer_names else []
    parents, fanout = len(group.parents), group.fanout
    consts: dict[str, Any] = {}
    tensor_names: list[str] = []
    tensors: list[torch.Tensor] = []
    dims: list[int | None] = []
    for n in names:
        values = [envs[q][n] for q in group.parents]
        v = values[0]
        if not isinstance(v, torch.Tensor):
            consts[n] = v
            continue
        if all(u is v for u in values):
            x, d = v, None
        else:
            x, d = _over_parents(values, origin), 0
        tensor_names.append(n)
        tensors.append(scale_grad(x, scale) if scale != 1.0 else x)
        dims.append(d)
    shape = (parents, fanout) if parents > 1 and fanout > 1 else None
    p_dict = {n: t.unflatten(0, shape) if shape else t for n, t in zip(group.param_names, params)}
    b_dict = {n: t.unflatten(0, shape) if shape else t for n, t in zip(group.buffer_names, buffers)}

    def call(p: dict, b: dict, *xs: torch.Tensor) -> dict[str, torch.Tensor]:
        return functional_call(slots.vmap_template, (p, b), (), {**consts, **dict(zip(tensor_names, xs))})

    fn: Callable = call
    if fanout > 1:  # children of one parent: the parent's activation is shared (in_dims None)
        fn = torch.vmap(fn, in_dims=(0, 0, *[None] * len(tensors)), randomness="different")
    if parents > 1:  # across parents: their activations are stacked
        fn = torch.vmap(fn, in_dims=(0, 0, *dims), randomness="different")
    with _cumulative_momentum(slots, b_dict):
        out = fn(p_dict, b_dict, *tensors)
    if buffers:  # BatchNorm updated the stacked copies of its running statistics
        write_back(buffers, [[getattr(m, a) for m, a in row] for row in slots.buffers])
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise NotBatchable(f"the segment returned {type(out).__name__} with non-tensor values")
    return {k: v.flatten(0, 1) for k, v in out.items()} if shape else out
