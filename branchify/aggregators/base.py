"""What an aggregator returns, and the base class every aggregator derives from.

An aggregator turns one :class:`~branchify.outputs.BranchedOutput` into *teacher targets*:
a list of :class:`KDTerm` (one soft-target distillation term each) and a dict of extra
logits that get their own cross-entropy with the labels (ONE's gated teacher, AHBF's
teacher assistants). :class:`~branchify.OnlineKD` turns the targets into a loss; the
aggregator never sees labels, temperatures or epochs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BranchifyError
from ..outputs import BranchedOutput, KDTerm, Targets  # noqa: F401  (KDTerm: re-exported for aggregators)


class AggregatorError(BranchifyError, ValueError):
    """An aggregator cannot be built or bound: names the missing size or the wrong input."""


class Aggregator(nn.Module):
    """Base class: ``forward(out) -> Targets`` plus :meth:`bind` to size layers from a model.

    Subclasses with layers build them in :meth:`_build` once every size is known, either
    from constructor arguments or, in :meth:`bind`, from the branched model's metadata
    (``num_leaves``, ``cut_channels()``, ``feature_dim``, ``feature_map_channels``,
    ``spec.target``). :meth:`branchify.contract.LeafModel.attach` calls :meth:`bind` and then assigns the
    aggregator to ``model.aggregator`` so its parameters train with the model; ``export()``
    drops them.

    Attributes:
        detach: the default detach rule of this aggregator's KD terms (each subclass
            documents its method's choice); ``OnlineKD(detach=...)`` overrides it.
    """

    detach: bool

    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.detach = bool(detach)
        self.num_leaves: int | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, model: Any) -> "Aggregator":
        """Take sizes the constructor did not fix from ``model`` and build the layers.

        Calling it again with a model of the same shape is a no-op; a model whose leaf count
        differs from an already built aggregator is an error.
        """
        k = _model_attr(model, "num_leaves")
        if k is not None:
            k = int(k)
            if self.num_leaves is not None and self.num_leaves != k:
                raise AggregatorError(
                    f"{type(self).__name__} was built for {self.num_leaves} leaves but the model has "
                    f"{k}; create a new aggregator for this model")
            self.num_leaves = k
        self._bind_sizes(model)
        self._build_if_ready()
        return self

    def _bind_sizes(self, model: Any) -> None:
        """Hook: read sizes this aggregator needs from ``model`` (default: nothing)."""

    def _build_if_ready(self) -> None:
        """Hook: create layers once all sizes are known (default: no layers)."""

    def _check_leaves(self, out: BranchedOutput, minimum: int = 1) -> int:
        k = out.num_leaves
        if self.num_leaves is not None and k != self.num_leaves:
            raise AggregatorError(f"{type(self).__name__} is bound to {self.num_leaves} leaves but the "
                                  f"output has {k}")
        if k < minimum:
            raise AggregatorError(f"{type(self).__name__} needs at least {minimum} leaves, the output has {k}")
        return k

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype of the parameters, or ``None`` for a parameter-free aggregator (it computes in
        the dtype of the outputs it is given: :meth:`dtype_for`)."""
        for p in self.parameters():
            return p.dtype
        return None

    def dtype_for(self, out: BranchedOutput) -> torch.dtype:
        """The dtype ``out`` is cast to before :meth:`forward`: the parameters' dtype, else the
        logits' dtype widened to at least float32 - so a float64 model gets float64 teachers and
        bf16/fp16 logits from autocast are still aggregated in float32.

        Examples:
            >>> from branchify.aggregators import Mean
            >>> z = [torch.zeros(2, 3, dtype=torch.float64)] * 2
            >>> Mean().dtype_for(BranchedOutput(z, [None] * 2, [None] * 2))
            torch.float64
        """
        fixed = self.compute_dtype
        if fixed is not None:
            return fixed
        dtype = out.logits[0].dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def forward(self, out: BranchedOutput) -> Targets:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(out) -> Targets")


def _model_attr(model: Any, name: str, *args: Any) -> Any:
    """``model.<name>`` (called with ``args`` when callable), or ``None`` when it is missing."""
    value = getattr(model, name, None)
    if callable(value) and not isinstance(value, nn.Module):
        try:
            return value(*args)
        except (KeyError, ValueError, TypeError, AttributeError):
            return None
    return value


def require_size(value: int | None, what: str, arg: str, owner: str) -> int:
    """Return ``value`` or raise an error telling the user which constructor argument to pass."""
    if value is None:
        raise AggregatorError(
            f"{owner} does not know {what}: the model did not report it. Pass {arg}=<int> to "
            f"{owner}(...) (or bind it to a branched model that reports it)")
    return int(value)


def pool(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """Average-pool an activation to ``[B, C]``.

    ``[B, C]`` is returned as is. For 4-D and higher the channel dim is 1 (``[B, C, H, W]``,
    global average pooling); for 3-D it is the last (``[B, L, C]`` token sequences, mean over
    tokens). ``channels`` resolves the other layout when it does not match.

    Examples:
        >>> pool(torch.ones(2, 8, 4, 4)).shape
        torch.Size([2, 8])
    """
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise AggregatorError(f"cannot pool an activation of shape {tuple(x.shape)}; expected [B, C, ...]")
    first = x.dim() != 3  # which layout to try first: channels-first unless [B, L, C]
    for channels_first in (first, not first):
        if channels_first and (channels is None or x.shape[1] == channels):
            return x.flatten(2).mean(dim=2)
        if not channels_first and (channels is None or x.shape[-1] == channels):
            return x.flatten(1, -2).mean(dim=1)
    raise AggregatorError(f"activation of shape {tuple(x.shape)} has no dim of size {channels} "
                          f"(the channels the aggregator was built for)")
