"""branchify: online knowledge distillation as a one-line change to any PyTorch model.

Example:
    >>> import torchvision, branchify as bf
    >>> net = torchvision.models.resnet18(num_classes=10)
    >>> bm = bf.branchify(net, bf.Spec(splits=["layer4"], fanout=[3]))    # ONE's tree
    >>> student = bm.export()                                             # a ResNet again
"""
from __future__ import annotations

from torch import nn

from . import aggregators, methods, metrics, schedules, viz
from .cohort import Cohort
from .loss import LossOutput, OnlineKD
from .methods import available_methods, method
from .model import BranchedModel, branchify
from .outputs import BranchedOutput
from .spec import INPUT, Spec, SpecError
from .surgery.partition import list_split_points
from .surgery.tracing import Tracer, TraceError, trace

__version__ = "0.1.0"


def split_points(model: nn.Module, tracer: Tracer | None = None, max_depth: int | None = None) -> list[str]:
    """Module paths that are valid split points, in execution order.

    ``"<input>"`` (no trunk) comes first. ``max_depth`` keeps only paths with at most that many
    dots + 1 components (``max_depth=1`` gives the top-level stages).

    Example:
        >>> split_points(torchvision.models.resnet18(), max_depth=1)      # doctest: +SKIP
        ['<input>', 'conv1', 'bn1', 'relu', 'maxpool', 'layer1', ..., 'layer4', 'avgpool', 'fc']
    """
    if tracer is None:
        from .surgery.hf_tracing import maybe_hf_tracer

        tracer = maybe_hf_tracer(model)
    points = list_split_points(trace(model, tracer))
    if max_depth is not None:
        points = [p for p in points if p == INPUT or p.count(".") < max_depth]
    return points


__all__ = ["BranchedModel", "BranchedOutput", "Cohort", "INPUT", "LossOutput", "OnlineKD", "Spec", "SpecError",
           "Tracer", "TraceError", "aggregators", "available_methods", "branchify", "method", "methods",
           "metrics", "schedules", "split_points", "trace", "viz"]
