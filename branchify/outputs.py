"""What a branched forward returns."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .tree import TreePath


@dataclass
class KDTerm:
    """One distillation term: ``weight * T^2 * KL(teacher || student)`` at the loss's temperature.

    Args:
        name: label used in the loss parts (``"kd/<name>"``), e.g. ``"leaf1"`` or ``"leaf0<-leaf2"``.
        teacher: teacher *logits* ``[B, ..., C]`` (or a :class:`LinearTeacher` that forms them),
            softened by the loss with its temperature.
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
        label_rule: a teacher that depends on the labels, named (a key of :data:`LABEL_RULES`):
            ``teacher`` then holds what the rule reads and the loss computes the teacher logits
            with the batch's labels (:func:`with_labels`), e.g. ``"min_logit"`` (KDCL-MinLogit).

    Examples:
        >>> z = torch.randn(4, 10)
        >>> term = KDTerm("leaf0", teacher=z.mean(0, keepdim=True).expand(4, 10), student=z)
        >>> term.is_mixture
        False
    """

    name: str
    teacher: "torch.Tensor | LinearTeacher"
    student: torch.Tensor
    weight: float = 1.0
    detach: bool | None = None
    teacher_log_weights: torch.Tensor | None = None
    label_rule: str | None = None

    @property
    def is_mixture(self) -> bool:
        """Whether the teacher is a mixture of softened components (see ``teacher_log_weights``)."""
        return self.teacher_log_weights is not None


@dataclass
class LinearTeacher:
    """Teacher logits that are a weighted sum of other logits, ``sum_k w_k z_k``, not yet formed.

    ONE's gate hands its teacher this way on large token-level outputs: the token-chunked loss
    (:mod:`branchify.token_chunks`) then forms it one chunk of positions at a time, so the
    ``[tokens, vocab]`` teacher and its gradient never exist; any other reader calls
    :meth:`logits` (or :func:`teacher_logits`), which forms it exactly as the gate would.

    Args:
        components: K logits ``[B, ..., C]`` of one shape (the leaves').
        weights: ``[B, K]`` (one weight per sample and component) or ``[B, ..., K]`` (per
            position: the components' shape with the class dim replaced by K).

    Examples:
        >>> z = [torch.ones(2, 3, 4), torch.zeros(2, 3, 4)]
        >>> LinearTeacher(z, torch.tensor([[0.25, 0.75], [1.0, 0.0]])).logits()[:, 0, 0].tolist()
        [0.25, 1.0]
    """

    components: list[torch.Tensor]
    weights: torch.Tensor

    def weight(self, k: int) -> torch.Tensor:
        """The weight of component ``k``, shaped to broadcast against it (``[B, 1, ..., 1]`` or ``[B, ..., 1]``)."""
        z, w = self.components[k], self.weights
        if w.dim() == z.dim():  # per position ([B, C] logits: per sample and per position coincide)
            return w[..., k].unsqueeze(-1)
        return w[:, k].reshape(w.shape[0], *([1] * (z.dim() - 1)))

    def per_position(self) -> torch.Tensor:
        """The weights as ``[B, ..., K]`` over every position of the components (an expanded view)."""
        z, w = self.components[0], self.weights
        if w.dim() == z.dim():
            return w
        return w.reshape(w.shape[0], *([1] * (z.dim() - 2)), w.shape[-1]).expand(*z.shape[:-1], w.shape[-1])

    def logits(self) -> torch.Tensor:
        """``sum_k w_k z_k`` as one tensor."""
        return sum(self.weight(k) * z for k, z in enumerate(self.components))  # type: ignore[return-value]


def teacher_logits(teacher: "torch.Tensor | LinearTeacher") -> torch.Tensor:
    """A teacher's logits: ``teacher`` itself, or a :class:`LinearTeacher` formed.

    Examples:
        >>> teacher_logits(LinearTeacher([torch.ones(1, 2)], torch.ones(1, 1))).tolist()
        [[1.0, 1.0]]
    """
    return teacher.logits() if isinstance(teacher, LinearTeacher) else teacher


def with_teacher_logits(targets: "Targets") -> "Targets":
    """``targets`` with every :class:`LinearTeacher` formed into logits (once per teacher, so a
    teacher shared by a cross-entropy and KD terms stays one tensor).

    Examples:
        >>> with_teacher_logits(Targets()).ce
        {}
    """
    formed: list[tuple[LinearTeacher, torch.Tensor]] = []

    def form(t):
        if not isinstance(t, LinearTeacher):
            return t
        for mix, z in formed:
            if mix is t:
                return z
        formed.append((t, t.logits()))
        return formed[-1][1]

    if not any(isinstance(t, LinearTeacher) for t in [*targets.ce.values(), *(k.teacher for k in targets.kd)]):
        return targets
    return Targets(kd=[replace(k, teacher=form(k.teacher)) for k in targets.kd],
                   ce={name: form(z) for name, z in targets.ce.items()})


@dataclass
class Targets:
    """Everything an aggregator produces for one batch.

    Args:
        kd: distillation terms.
        ce: name -> extra logits (or a :class:`LinearTeacher`) that get a cross-entropy with the
            labels (for example ``{"teacher": z_e}`` for ONE). Logged as ``"ce/<name>"``.

    Examples:
        >>> Targets(kd=[], ce={})
        Targets(kd=[], ce={})
    """

    kd: list[KDTerm] = field(default_factory=list)
    ce: "dict[str, torch.Tensor | LinearTeacher]" = field(default_factory=dict)


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
    cuts: dict[TreePath, torch.Tensor] = field(default_factory=dict)
    leaf_paths: list[TreePath] = field(default_factory=list)
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

    Examples:
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


def min_logit_teacher(stacked: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit's teacher from the students' logits ``[K, B, ..., C]``: per class, the minimum
    over students of ``z_k[c] - z_k[y]`` (each student's logits shifted so the true class is 0).
    Ignored positions (``y = -100``) read class 0; the loss masks them.

    Examples:
        >>> z = torch.tensor([[[2.0, 0.0, 1.0]], [[0.0, 1.0, 3.0]]])
        >>> min_logit_teacher(z, torch.tensor([0])).tolist()
        [[0.0, -2.0, -1.0]]
    """
    idx = y.clamp(min=0).unsqueeze(-1).unsqueeze(0).expand(*stacked.shape[:-1], 1)
    return (stacked - stacked.gather(-1, idx)).min(dim=0).values


LABEL_RULES = {"min_logit": min_logit_teacher}
"""Teachers that need the labels: ``KDTerm.label_rule`` -> ``rule(term.teacher, y) -> teacher logits``."""


def with_labels(targets: Targets, y: torch.Tensor) -> Targets:
    """``targets`` with every label-dependent teacher (``KDTerm.label_rule``) computed from ``y``
    (:class:`~branchify.OnlineKD` calls it; the others are returned as they are).

    Examples:
        >>> with_labels(Targets(), torch.tensor([0])).kd
        []
    """
    if all(t.label_rule is None for t in targets.kd):
        return targets
    kd = []
    for t in targets.kd:
        if t.label_rule is not None:
            if t.label_rule not in LABEL_RULES:
                raise ValueError(f"KDTerm {t.name!r}: label_rule={t.label_rule!r} is unknown; "
                                 f"known: {list(LABEL_RULES)}")
            t = replace(t, teacher=LABEL_RULES[t.label_rule](t.teacher, y), label_rule=None)
        kd.append(t)
    return Targets(kd=kd, ce=targets.ce)


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


_register(LinearTeacher, ("components", "weights"), ())
_register(KDTerm, ("teacher", "student", "teacher_log_weights"), ("name", "weight", "detach", "label_rule"))
_register(Targets, ("kd", "ce"), ())
_register(BranchedOutput, ("logits", "features", "feature_maps", "cuts", "targets", "temporal", "hybrid"),
          ("leaf_paths",))
