"""ONE's gate: a learned, per-sample weighting of the leaves' logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import token_chunks
from ..outputs import BranchedOutput, LinearTeacher
from ..tree import TreePath, segment_key
from .base import Aggregator, AggregatorError, KDTerm, Targets, _model_attr, pool, require_size


def _per_sample(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample weights ``[B]`` to broadcast against ``like`` (``[B, ..., C]``)."""
    return weight.reshape(weight.shape[0], *([1] * (like.dim() - 1)))


def _next_block(gm: nn.Module, layer: str) -> str | None:
    """The module after the one holding ``layer`` (its next sibling, or that sibling's first child):
    ``layers.3.downsample.norm`` -> ``layers.3.blocks.0``."""
    parts = layer.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent, owner = ".".join(parts[:depth - 1]), parts[depth - 1]
        names = [n for n, _ in gm.get_submodule(parent).named_children()]
        if owner in names and names.index(owner) + 1 < len(names):
            block = ".".join(p for p in (parent, names[names.index(owner) + 1]) if p)
            first = next(iter(gm.get_submodule(block).named_children()), None)
            return f"{block}.{first[0]}" if first is not None else block
    return None


def _check_cut_readable(model, cut: TreePath) -> None:
    """Raise when the first layer reading ``cuts[cut]`` reads it reshaped (its width need not be the cut's)."""
    from ..surgery.widths import regrouped_width

    layout, segments = getattr(model, "layout", None), getattr(model, "segments", None)
    children = getattr(layout, "children", {}).get(cut) if segments is not None else None
    if not children or layout.cut_names[len(children[0])] is None:
        return
    gm = segments[segment_key(children[0])]
    found = regrouped_width(gm, layout.cut_names[len(children[0])])
    if found is None:
        return
    width, layer, reshape = found
    block = _next_block(gm, layer) if "." in layer else None
    where = f"split={block!r}" if block else "split=<a block after that reshape>"
    raise AggregatorError(
        f"Gate cannot tell the channels of cuts[{cut}]: the first layer reading it ({layer}, {width} wide) "
        f"reads it through a reshape ({reshape}) that regroups its channels, so {width} need not be its "
        f"width. Cut after that layer's module instead ({where}), or give the width: Gate(channels=<C>)")


class Gate(Aggregator):
    """ONE (Lan et al. 2018): gate on the shared trunk activation, teacher = gated sum of logits.

    ``g = softmax(ReLU(BN1d(Linear(C -> K)(GAP(cuts[cut])))))`` and ``z_e = sum_k g_k z_k`` per
    sample. Targets: ``CE(z_e)`` (named ``"teacher"``) and ``KL(p_e || p_k)`` for every leaf.

    Default detach: ``True`` as in ONE's official code - the KD terms treat ``p_e`` as a
    constant, so the gate learns only through ``CE(z_e)``. With ``detach=False`` (OKDDip's
    ONE re-implementation) the gate also learns from the KD terms.

    On large token-level outputs (``[B, L, V]`` logits with ``B L V (K + 1)`` at least
    :data:`~branchify.token_chunks.AUTO_MIN_ELEMENTS`, where the loss chunks by default) ``z_e``
    is handed as a :class:`~branchify.outputs.LinearTeacher` (the leaves' logits and ``g``), so
    the token-chunked loss forms it chunk by chunk instead of holding ``[B, L, V]`` teacher logits
    and their gradient; ``.logits()`` forms it, and an unchunked loss does so itself (same values).

    Args:
        channels: channels of the gate's input (``model.cut_channels(cut)`` when bound).
        num_leaves: number of leaves K (``model.num_leaves`` when bound).
        cut: tree path of the activation the gate reads (``()`` = trunk output).
        detach: default detach rule of the KD terms.
        linear_teacher: ``"auto"`` hands ``z_e`` as a ``LinearTeacher`` on large token-level
            outputs only (see above), ``True`` always, ``False`` never (always a tensor).

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> gate = Gate(channels=16, num_leaves=3)
        >>> out = BranchedOutput([torch.randn(4, 10) for _ in range(3)], [None] * 3, [None] * 3,
        ...                      cuts={(): torch.randn(4, 16, 8, 8)})
        >>> gate(out).ce["teacher"].shape
        torch.Size([4, 10])
    """

    def __init__(self, channels: int | None = None, num_leaves: int | None = None, *,
                 cut: TreePath = (), detach: bool = True, linear_teacher: bool | str = "auto") -> None:
        super().__init__(detach=detach)
        if linear_teacher not in (True, False, "auto"):
            raise AggregatorError(f"Gate(linear_teacher=...) must be 'auto', True or False, got {linear_teacher!r}")
        self.linear_teacher = linear_teacher
        self.channels = channels
        self.num_leaves = num_leaves
        self.cut = tuple(cut)
        self.fc: nn.Linear | None = None
        self.bn: nn.BatchNorm1d | None = None
        self._build_if_ready()

    def _bind_sizes(self, model) -> None:
        if self.channels is None:
            _check_cut_readable(model, self.cut)
            self.channels = _model_attr(model, "cut_channels", self.cut)

    def _build_if_ready(self) -> None:
        if self.fc is None and self.channels is not None and self.num_leaves is not None:
            self.fc = nn.Linear(int(self.channels), int(self.num_leaves))
            self.bn = nn.BatchNorm1d(int(self.num_leaves))

    def gate_weights(self, out: BranchedOutput) -> torch.Tensor:
        """Per-sample leaf weights ``g`` of shape ``[B, K]`` (rows sum to 1)."""
        if self.fc is None or self.bn is None:
            require_size(self.channels, f"the channels of cuts[{self.cut}]", "channels", "Gate")
            require_size(self.num_leaves, "the number of leaves", "num_leaves", "Gate")
        if self.cut not in out.cuts:
            raise AggregatorError(f"Gate reads cuts[{self.cut}] but the output only has cuts "
                                  f"{sorted(out.cuts)}; pass Gate(cut=<one of those>)")
        h = pool(out.cuts[self.cut], self.channels)
        return F.softmax(F.relu(self.bn(self.fc(h))), dim=1)

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        g = self.gate_weights(out)
        if self._defers(out.logits):
            teacher: torch.Tensor | LinearTeacher = LinearTeacher(list(out.logits), g)
        else:
            teacher = sum(_per_sample(g[:, k], z) * z for k, z in enumerate(out.logits))  # type: ignore[assignment]
        kd = [KDTerm(f"leaf{k}", teacher=teacher, student=z, detach=self.detach)
              for k, z in enumerate(out.logits)]
        return Targets(kd=kd, ce={"teacher": teacher})

    def _defers(self, logits: list[torch.Tensor]) -> bool:
        """Whether the teacher is handed as a ``LinearTeacher`` (see the class docstring)."""
        if self.linear_teacher != "auto":
            return bool(self.linear_teacher)
        return logits[0].dim() >= 3 and logits[0].numel() * (len(logits) + 1) >= token_chunks.AUTO_MIN_ELEMENTS
