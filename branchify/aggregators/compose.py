"""Several teachers at once: the union of their targets, each under its own name."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, Targets


class Compose(Aggregator):
    """Run several aggregators on the same output and return all their targets.

    Each part's KD terms and CE teachers are renamed ``"<part>/<name>"`` (``kd/pe/leaf0``,
    ``ce/pe/teacher`` in the loss parts), so two teachers of the same leaf never share a name.
    Every part is bound to the model (sized from it) and trains with it; each term keeps its own
    part's detach rule. PCL composes its peer-ensemble teacher (:class:`FeatureFusion`) with its
    temporal-mean teacher this way.

    Args:
        **parts: name -> aggregator (names: identifiers, no ``/``).

    Examples:
        >>> import torch
        >>> from branchify.aggregators import Mean, Pairwise
        >>> from branchify.outputs import BranchedOutput
        >>> both = Compose(mean=Mean(), pair=Pairwise())
        >>> t = both(BranchedOutput([torch.randn(2, 4) for _ in range(2)], [None] * 2, [None] * 2))
        >>> [term.name for term in t.kd]
        ['mean/leaf0', 'mean/leaf1', 'pair/leaf0<-leaf1', 'pair/leaf1<-leaf0']
    """

    def __init__(self, **parts: Aggregator) -> None:
        super().__init__(detach=True)
        if not parts:
            raise AggregatorError("Compose needs at least one aggregator: Compose(name=Aggregator(), ...)")
        for name, agg in parts.items():
            if not isinstance(agg, Aggregator):
                raise AggregatorError(f"Compose part {name!r} is a {type(agg).__name__}, not a "
                                      f"branchify.aggregators.Aggregator")
            if "/" in name or "." in name:
                raise AggregatorError(f"Compose part name {name!r} may not contain '/' or '.'")
        self.parts = nn.ModuleDict(parts)

    def bind(self, model) -> "Compose":
        super().bind(model)
        for agg in self.parts.values():
            agg.bind(model)
        return self

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        targets = Targets()
        for name, agg in self.parts.items():
            t = agg(out)
            targets.kd.extend(replace(term, name=f"{name}/{term.name}") for term in t.kd)
            targets.ce.update({f"{name}/{k}": v for k, v in t.ce.items()})
        return targets
