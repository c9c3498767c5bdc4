"""What a branched forward returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KDTerm:
    """One distillation term: ``weight * T^2 * KL(teacher || student)`` at the loss's temperature.

    Args:
        name: label used in the loss parts (``"kd/<name>"``), e.g. ``"leaf1"`` or ``"leaf0<-leaf2"``.
        teacher: teacher *logits* ``[B, ..., C]``, softened by the loss with its temperature.
            When ``teacher_log_weights`` is given, ``teacher`` instead stacks K component logits
            along a new dim 0 (``[K, B, ..., C]``) and the teacher distribution is the mixture
            ``sum_k exp(teacher_log_weights[k]) * softmax(teacher[k] / T)``. This is how a teacher
            that averages *probabilities* (MD's accuracy-weighted soft labels, OKDDip's
            probability-space targets) is expressed without the aggregator knowing T; the loss
            evaluates it in log space (``logsumexp``), so nothing is ever ``log(0)``.
        student: student logits ``[B, ..., C]``.
        weight: multiplies this term (e.g. ``1/(K-1)`` in pairwise DML, ``lambda1`` in AHBF).
        detach: ``True`` treats the teacher (and its mixture weights) as a constant, ``False``
            lets gradient flow into it, ``None`` follows the loss's default (detached).
        teacher_log_weights: optional log mixture weights, shape ``[K]`` or ``[K, B, ...]``
            (the teacher's shape without the class dim); must be normalised (logsumexp = 0).

    Example:
        >>> z = torch.randn(4, 10)
        >>> term = KDTerm("leaf0", teacher=z.mean(0, keepdim=True).expand(4, 10), student=z)
        >>> term.is_mixture
        False
    """

    name: str
    teacher: torch.Tensor
    student: torch.Tensor
    weight: float = 1.0
    detach: bool | None = None
    teacher_log_weights: torch.Tensor | None = None

    @property
    def is_mixture(self) -> bool:
        """Whether the teacher is a mixture of softened components (see ``teacher_log_weights``)."""
        return self.teacher_log_weights is not None


@dataclass
class Targets:
    """Everything an aggregator produces for one batch.

    Args:
        kd: distillation terms.
        ce: name -> extra logits that get a cross-entropy with the labels (for example
            ``{"teacher": z_e}`` for ONE). Logged as ``"ce/<name>"``.

    Example:
        >>> Targets(kd=[], ce={})
        Targets(kd=[], ce={})
    """

    kd: list[KDTerm] = field(default_factory=list)
    ce: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BranchedOutput:
    """Per-leaf results of one forward through the branch tree.

    Leaves are in depth-first order, child 0 first (leaf 0 = the all-child-0 path).

    Attributes:
        logits: one ``[B, classes]`` (or ``[B, ..., classes]``) tensor per leaf.
        features: per leaf, the penultimate features (input of the final ``Linear``, after
            skipping a dropout in front of it), or ``None`` when the model has no final Linear.
        feature_maps: per leaf, the feature map before global pooling (``[B, C, H, W]``), or
            ``None`` when the classifier does not pool (AHBF's fusion uses these).
        cuts: tree-node path -> the shared activation entering that node's children
            (``()`` is the trunk output; with a ``"<input>"`` split it is the model input).
            ONE's gate reads ``cuts[()]``.
        leaf_paths: the tree path of every leaf, same order as ``logits``.
        targets: the teacher targets the model's aggregator built from this output (``None``
            until :meth:`branchify.contract.LeafModel.aggregate` ran; empty without an aggregator).
        temporal: the temporal-mean (EMA) copy's leaf outputs on the same inputs, detached
            (:class:`branchify.temporal.TemporalMean`; ``None`` when the model has none).
        hybrid: the hybrid-weight model's output on the same inputs, one leaf
            (:class:`branchify.hybrid.WeightFusion`, OKDPH; ``None`` when the model has none).
    """

    logits: list[torch.Tensor]
    features: list[torch.Tensor | None]
    feature_maps: list[torch.Tensor | None]
    cuts: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    leaf_paths: list[tuple[int, ...]] = field(default_factory=list)
    targets: Targets | None = None
    temporal: "BranchedOutput | None" = None
    hybrid: "BranchedOutput | None" = None

    @property
    def num_leaves(self) -> int:
        return len(self.logits)


def classifier_logits(result: Any) -> torch.Tensor | None:
    """The logits in what a classifier's forward returns: a tensor, an object with ``.logits``
    (Hugging Face outputs), or a tuple/list whose first item is a tensor; ``None`` for anything
    else (callers raise an error that names their context).

    Example:
        >>> classifier_logits((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    return None


# ---------------------------------------------------------------------- pytrees
# The output types are registered as pytrees, so torch.export / torch.compile / vmap see the
# tensors inside them (``torch.export.export(branched_model, (x,))`` returns a BranchedOutput).
def _register(cls: type, tensors: tuple[str, ...], context: tuple[str, ...]) -> None:
    from torch.utils import _pytree as pytree

    def flatten(obj):
        return [getattr(obj, f) for f in tensors], tuple(getattr(obj, f) for f in context)

    def flatten_with_keys(obj):
        return [(pytree.GetAttrKey(f), getattr(obj, f)) for f in tensors], tuple(getattr(obj, f) for f in context)

    def unflatten(values, ctx):
        return cls(**dict(zip(tensors, values)), **dict(zip(context, ctx)))

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name=f"branchify.outputs.{cls.__name__}")


_register(KDTerm, ("teacher", "student", "teacher_log_weights"), ("name", "weight", "detach"))
_register(Targets, ("kd", "ce"), ())
_register(BranchedOutput, ("logits", "features", "feature_maps", "cuts", "targets", "temporal", "hybrid"),
          ("leaf_paths",))
