"""Named method presets: one call builds the paper's tree, aggregator and loss around a model.

Examples:
    >>> import torchvision, branchify as bf
    >>> model, okd = bf.method("one", torchvision.models.resnet18(num_classes=10))   # doctest: +SKIP
    >>> model, okd = bf.method("tsa", net, split=["layer2", "layer3"], alpha=0.3)    # doctest: +SKIP

Every preset is one module here with the same shape - a frozen dataclass of its options (every
option it takes, its default and what it means, deriving from
:class:`~branchify.methods.options.CommonOptions`), ``build(model, options, tracer) -> Built``
(the tree, aggregator and loss options, and the choices it made: :class:`~branchify.methods.options.Built`)
and its registration - and its docstring says what it computes and where that comes from.
``method_options(name)`` gives a preset's options object at its defaults:

======== ==================================== =================== ==========================
name     tree (default)                       aggregator          loss defaults
======== ==================================== =================== ==========================
one      3 leaves at the last stage           Gate (detached)     T=3, ramp 80/300 of run
cl_ilr   ONE's tree, grad x 1/K into trunk    PeerMean            T=3, ramp 80/300 of run
okddip   4 leaves (leader = target leaf 0)    PeerAttention       T=3, ramp 80/300, not detached
tsa      splits at last two stages, [2, 2]    Pairwise (detached) T=3, CE x (1-a), KD x a, a=0.5
u_tsa    same splits, fanout [2, [3, 1]]      Pairwise (detached) as tsa
ahbf     4 leaves, leaf m gets a*m blocks     HierarchicalTA      T=3, ramp over whole run
dml      "<input>": 2 whole networks          Pairwise (detached) T=1, no ramp
kdcl     "<input>": 2 nets, own view each     Mean (detached)     T=4, (1-a) CE + a KD, a=0.5
pcl      3 peers at the last stage, own views FeatureFusion + EMA  T=3, PCL's ramp, EMA deployed
okdph    "<input>": 2 nets + weight hybrid    HybridTeacher       T=4, .8 CE + .8 KD, fuse/epoch
======== ==================================== =================== ==========================

Without ``split=`` every preset cuts where :mod:`branchify.surgery.default_split` says - one rule
for every model (the last stage of a ResNet: ``layer4``, TSA ``["layer3", "layer4"]``; a CIFAR
ResNet: ``layer3``, TSA ``["layer2", "layer3"]``; the 9th of 12 transformer layers...), recorded in
``model.split_reason`` and printed by ``describe()``.
"""
import sys

from ..surgery.default_split import default_splits
from . import ahbf, cl_ilr, dml, kdcl, okddip, okdph, one, pcl, tsa  # noqa: F401  (each registers its preset)
from .common import COMMON, ONE_RAMP
from .options import Built, CommonOptions, Renamed
from .presets import (
    MethodError,
    Preset,
    available_methods,
    get_preset,
    method,
    method_options,
    nearest,
    register_method,
    resolve,
)

# The preset table was ``branchify.methods.registry`` until it was renamed to ``presets`` (one
# ``registry`` - the plugins, ``branchify.registry`` - is enough); the old path stays importable for
# code written against it, as this same module (one _REGISTRY, one register_method), not a copy.
sys.modules[__name__ + ".registry"] = sys.modules[__name__ + ".presets"]

__all__ = ["Built", "COMMON", "CommonOptions", "MethodError", "ONE_RAMP", "Preset", "Renamed", "available_methods",
           "default_splits", "get_preset", "method", "method_options", "nearest", "register_method", "resolve"]
