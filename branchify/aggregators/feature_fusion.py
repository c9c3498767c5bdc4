"""Feature teachers: a classifier on the leaves' concatenated features (PCL's peer-ensemble teacher)."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets, _model_attr, pool, require_size

SOURCES = ("auto", "features", "feature_maps")


class FeatureFusion(Aggregator):
    """Teacher logits from the leaves' *features*, not their logits: ``z_e = W [h_1; ...; h_K] + b``.

    ``h_k`` is leaf k's penultimate feature vector (``out.features``; ``source="feature_maps"``
    global-average-pools ``out.feature_maps`` instead; ``"auto"``, the default, takes the features
    and, for a model whose classifier is a convolution (SqueezeNet), the map that convolution
    reads) and ``W, b`` a fused ``Linear(sum_k d_k -> classes)`` trained with the model. Targets:
    ``CE(z_e)`` named ``"teacher"`` (gradient flows into the fused classifier *and* every leaf's
    features) and, with ``kd=True``, ``KL(p_e || p_k)`` for every leaf ``k`` (named ``"leaf{k}"``).

    This is PCL's peer-ensemble teacher (Wu & Gong, AAAI 2021): in the reproduction
    ``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473``,
    ``src/models/resnet.py`` lines 161 and 217-219 (``en_fc`` on ``torch.cat`` of the peers'
    pooled features), ``src/losses/loss_wrapper.py`` line 41 (``CE(pred_en)``) and lines 46/51/56
    with ``src/controller.py`` line 42 (each peer's ``KDLoss`` against ``en_output.detach()``).

    Default detach: ``True`` as that code - the fused classifier learns only through its CE.

    Sizes are read when the aggregator is bound to a model (``bf.method`` / ``OnlineKD`` /
    ``model.attach``): the feature width per leaf (``model.feature_dims`` of a
    :class:`~branchify.Cohort` - peers of different widths concatenate fine - else
    ``model.feature_dim`` or ``model.feature_map_channels``) and ``model.num_classes``.

    Args:
        in_features: per-leaf feature widths (a list), or one width for every leaf.
        num_classes: classes of the fused classifier.
        num_leaves: number of leaves K.
        leaves: indices of the leaves whose features are fused (default: all).
        source: ``"auto"``, ``"features"`` or ``"feature_maps"`` (pooled to ``[B, C]``).
        kd: add the KD terms (``False``: a CE-trained fused head only, e.g. to compose with other teachers).
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> fusion = FeatureFusion(in_features=16, num_classes=5, num_leaves=3)
        >>> out = BranchedOutput([torch.randn(4, 5) for _ in range(3)],
        ...                      [torch.randn(4, 16) for _ in range(3)], [None] * 3)
        >>> targets = fusion(out)
        >>> fusion.fc, targets.ce["teacher"].shape, [t.name for t in targets.kd]
        (Linear(in_features=48, out_features=5, bias=True), torch.Size([4, 5]), ['leaf0', 'leaf1', 'leaf2'])
    """

    def __init__(self, in_features: int | Sequence[int] | None = None, num_classes: int | None = None,
                 num_leaves: int | None = None, *, leaves: Sequence[int] | None = None,
                 source: Literal["auto", "features", "feature_maps"] = "auto", kd: bool = True,
                 detach: bool = True) -> None:
        super().__init__(detach=detach)
        if source not in SOURCES:
            raise AggregatorError(f"FeatureFusion(source={source!r}) is unknown; choose one of {list(SOURCES)}")
        if leaves is not None and (not len(leaves) or any(not isinstance(k, int) or k < 0 for k in leaves)):
            raise AggregatorError(f"FeatureFusion(leaves={leaves!r}) must be a non-empty list of leaf indices")
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_leaves = num_leaves
        self.leaves = None if leaves is None else [int(k) for k in leaves]
        self.source = source
        self.kd = bool(kd)
        self.fc: nn.Linear | None = None
        self._build_if_ready()

    def _bind_sizes(self, model) -> None:
        if self.in_features is None:
            dims = getattr(model, "feature_dims", None) if self.source != "feature_maps" else None
            if dims is not None and None not in dims:
                self.in_features = list(dims)
            elif self.source != "feature_maps":
                self.in_features = _model_attr(model, "feature_dim")
            if self.in_features is None and self.source != "features":
                self.in_features = _model_attr(model, "feature_map_channels")
                self.source = "feature_maps" if self.in_features is not None else self.source
            elif self.source == "auto":
                self.source = "features"
        if self.num_classes is None:
            self.num_classes = _model_attr(model, "num_classes")

    def fused(self) -> list[int]:
        """Indices of the leaves whose features are concatenated, in order."""
        k = require_size(self.num_leaves, "the number of leaves", "num_leaves", "FeatureFusion")
        chosen = list(range(k)) if self.leaves is None else self.leaves
        bad = [i for i in chosen if i >= k]
        if bad:
            raise AggregatorError(f"FeatureFusion(leaves={self.leaves}) names leaves {bad}, but the model has "
                                  f"leaves 0..{k - 1}")
        return chosen

    def _widths(self) -> list[int] | None:
        if self.in_features is None or self.num_leaves is None:
            return None
        chosen = self.fused()
        if isinstance(self.in_features, int):
            return [int(self.in_features)] * len(chosen)
        dims = [int(d) for d in self.in_features]
        if len(dims) != self.num_leaves:
            raise AggregatorError(f"FeatureFusion(in_features={dims}) gives {len(dims)} widths for "
                                  f"{self.num_leaves} leaves; give one per leaf or a single int")
        return [dims[i] for i in chosen]

    def _build_if_ready(self) -> None:
        widths = self._widths()
        if self.fc is None and widths is not None and self.num_classes is not None:
            self.fc = nn.Linear(sum(widths), int(self.num_classes))

    def teacher_logits(self, out: BranchedOutput) -> torch.Tensor:
        """The fused classifier's logits ``z_e`` of shape ``[B, ..., classes]``."""
        if self.fc is None:
            require_size(self.in_features, f"the width of out.{self.source}", "in_features", "FeatureFusion")
            require_size(self.num_classes, "the number of classes", "num_classes", "FeatureFusion")
        chosen = self.fused()
        if self.source == "auto":  # not bound to a model: the features where every leaf has them
            self.source = "features" if all(out.features[i] is not None for i in chosen) else "feature_maps"
        feats = out.features if self.source == "features" else out.feature_maps
        missing = [i for i in chosen if feats[i] is None]
        if missing:
            raise AggregatorError(f"FeatureFusion reads out.{self.source} but leaves {missing} have none (the model "
                                  f"has no final Linear / no pooled feature map); build the branched model with "
                                  f"feature_node=<module path>, or use source='features'/'feature_maps'")
        hs = [feats[i] if self.source == "features" else pool(feats[i]) for i in chosen]
        return self.fc(torch.cat(hs, dim=-1))

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        teacher = self.teacher_logits(out)
        kd = [KDTerm(f"leaf{k}", teacher=teacher, student=z, detach=self.detach)
              for k, z in enumerate(out.logits)] if self.kd else []
        return Targets(kd=kd, ce={"teacher": teacher})
