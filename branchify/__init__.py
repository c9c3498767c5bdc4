"""branchify: online knowledge distillation as a one-line change to any PyTorch model.

Examples:
    >>> import torchvision, branchify as bf
    >>> net = torchvision.models.resnet18(num_classes=10)
    >>> bm = bf.branchify(net, bf.Spec(splits=["layer4"], fanout=[3]))    # ONE's tree
    >>> student = bm.export()                                             # a ResNet again

Layout: :func:`branchify` (``build.py``) traces and cuts a model into a :class:`BranchedModel`
(``model.py``, a :class:`~branchify.contract.LeafModel`), whose forward runs the tree
(``surgery/runner.py``) and its aggregator (``aggregators/``); :class:`OnlineKD`
(``online_kd.py``) turns the output into the loss. :func:`method` (``methods/``) builds a paper's
preset in one call (its table of presets: ``methods/presets.py``); framework glue lives in
``integrations/`` and registers itself as a plugin (``registry.py``).
"""
from . import aggregators, methods, metrics, schedules, views, viz
from .build import branchify
from .cohort import Cohort
from .contract import LeafModel
from .errors import BranchifyError
from .methods import available_methods, method, method_options
from .model import BranchedModel
from .online_kd import LossOutput, OnlineKD
from .outputs import BranchedOutput
from .spec import INPUT, Spec, SpecError
from .surgery.pretrained import pretrained_peers
from .surgery.split_points import split_points
from .surgery.tracing import TraceError, Tracer, trace
from .temporal import TemporalMean

__version__ = "0.2.0"

__all__ = ["BranchedModel", "BranchedOutput", "BranchifyError", "Cohort", "INPUT", "LeafModel", "LossOutput",
           "OnlineKD", "Spec", "SpecError", "Tracer", "TraceError", "aggregators", "available_methods", "branchify",
           "method", "method_options", "methods", "metrics", "pretrained_peers", "schedules", "split_points",
           "TemporalMean", "trace", "views", "viz"]
