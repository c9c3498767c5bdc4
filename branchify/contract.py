"""The leaf-model contract: what every model with branch leaves provides.

:class:`~branchify.model.BranchedModel` (one traced model cut into a tree), :class:`~branchify.Cohort`
(separate networks) and :class:`~branchify.distributed.DistributedCohort` (peers across ranks)
all derive from :class:`LeafModel`, and losses, metrics, aggregators and integrations type
against it.

Ownership: **the model owns its aggregator.** ``model.attach(aggregator)`` sizes the aggregator
from the model (:meth:`~branchify.aggregators.Aggregator.bind`) and registers it as the submodule
``model.aggregator``; every forward then runs it on the leaves' outputs and returns the teacher
targets in ``out.targets``. Consequences a user can rely on:

- ``model.parameters()`` includes the aggregator's, so one optimiser trains everything;
- wrapping the model in DDP/FSDP synchronises the aggregator too (it runs inside ``forward``);
- ``state_dict()`` holds it under ``aggregator.*``; ``export()`` leaves it out;
- the loss (:class:`~branchify.OnlineKD`) holds no module of the model: it reads ``out.targets``,
  so it can be pickled, copied or rebuilt without a second, stale copy of the aggregator.

Attach before wrapping in DDP/FSDP: a wrapper only synchronises the parameters it saw when it
was built.

Examples:
    >>> import branchify as bf
    >>> bm = bf.branchify(net, bf.Spec(splits=["layer4"], fanout=[3]))       # doctest: +SKIP
    >>> bm.attach(bf.aggregators.Gate())                                      # doctest: +SKIP
    >>> out = bm(x); out.targets.ce["teacher"].shape                          # doctest: +SKIP
"""
from __future__ import annotations

import abc
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .aggregators.base import Aggregator
from .outputs import BranchedOutput, Targets
from .tree import TreePath
from .utils import no_autocast

if TYPE_CHECKING:
    from .spec import Spec


def _cast(out: BranchedOutput, dtype: torch.dtype) -> BranchedOutput:
    """``out`` with every floating tensor in ``dtype`` (autograd flows through the cast)."""
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return replace(out, logits=[cast(z) for z in out.logits], features=[cast(f) for f in out.features],
                   feature_maps=[cast(f) for f in out.feature_maps],
                   cuts={k: cast(v) for k, v in out.cuts.items()},
                   temporal=_cast(out.temporal, dtype) if out.temporal is not None else None,
                   hybrid=_cast(out.hybrid, dtype) if out.hybrid is not None else None)


class LeafModel(nn.Module, abc.ABC):
    """Base of every model whose forward returns one output per leaf (see the module docstring).

    Subclasses set ``spec`` (the tree; ``spec.target`` is the deployed leaf) and ``leaf_paths``,
    and implement :meth:`forward_leaves` and :meth:`export`. They may refine the size hints
    aggregators bind to (:attr:`feature_dim`, :attr:`feature_map_channels`, :meth:`cut_channels`)
    and :meth:`check_aggregator`, which rejects an aggregator this kind of model cannot feed.
    """

    spec: "Spec"
    leaf_paths: list[TreePath]
    aggregator: Aggregator | None

    def __init__(self) -> None:
        super().__init__()
        self.aggregator = None

    # ------------------------------------------------------------------ size hints
    @property
    def num_leaves(self) -> int:
        return len(self.leaf_paths)

    @property
    def target(self) -> int:
        """Index of the deployed leaf."""
        return self.spec.target

    @property
    def feature_dim(self) -> int | None:
        """Width of ``out.features`` (``None`` if unknown)."""
        return None

    @property
    def feature_map_channels(self) -> int | None:
        """Channels of ``out.feature_maps`` (``None`` if there are none)."""
        return None

    def cut_channels(self, path: TreePath = ()) -> int | None:
        """Channels of ``out.cuts[path]`` (``None`` if there is no such cut)."""
        return None

    # ------------------------------------------------------------------ the aggregator
    def check_aggregator(self, aggregator: Aggregator) -> None:
        """Raise if this model cannot feed ``aggregator`` (default: every aggregator is fine)."""

    def attach(self, aggregator: Aggregator | None) -> Aggregator | None:
        """Make ``aggregator`` this model's teacher builder (``None`` removes it); returns it.

        It is sized from this model, moved to the model's device and dtype, and registered as
        ``self.aggregator``. Nothing is changed if it is rejected.

        Examples:
            >>> gate = bm.attach(bf.aggregators.Gate())     # doctest: +SKIP
        """
        if aggregator is None:
            self.aggregator = None
            return None
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be a branchify.aggregators.Aggregator, got {type(aggregator).__name__}")
        self.check_aggregator(aggregator)
        aggregator.bind(self)
        ref = next(iter(self.parameters()), None)
        if ref is not None:
            aggregator.to(device=ref.device)
        aggregator.train(self.training)  # an eval-mode model gets an eval-mode aggregator
        self.aggregator = aggregator
        return aggregator

    def aggregate(self, out: BranchedOutput) -> BranchedOutput:
        """``out`` with ``targets`` from this model's aggregator (empty targets without one).

        The aggregator runs in its parameters' dtype with autocast off, so bf16/fp16 autocast
        never reaches the teacher arithmetic. :meth:`forward` calls it; call it yourself on an
        output built by hand.
        """
        if self.aggregator is None:
            return replace(out, targets=Targets())
        with no_autocast(out.logits[0].device):
            targets = self.aggregator(_cast(out, self.aggregator.dtype_for(out)))
        return replace(out, targets=targets)

    # ------------------------------------------------------------------ forward and deployment
    def forward(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """The leaves' outputs and, in ``out.targets``, the aggregator's teacher targets (and, with a
        :class:`~branchify.temporal.TemporalMean` attached, its outputs in ``out.temporal``; with a
        :class:`~branchify.hybrid.WeightFusion`, the hybrid's in ``out.hybrid``)."""
        out = self.forward_leaves(*args, **kwargs)
        temporal = self._modules.get("temporal")
        if temporal is not None:
            out = replace(out, temporal=temporal(*args, **kwargs))
        fusion = self._modules.get("fusion")
        if fusion is not None:
            out = replace(out, hybrid=fusion(*args, **kwargs))
        return self.aggregate(out)

    @abc.abstractmethod
    def forward_leaves(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """Every leaf's logits and features for the inputs, without the aggregator."""

    @abc.abstractmethod
    def export(self, leaf: int | None = None) -> nn.Module:
        """The deployable model of one leaf (default: the target)."""
