"""Aggregators: turn a branched forward into teacher targets (one module per method).

Examples:
    >>> from branchify.aggregators import Gate, Mean, Pairwise
    >>> Mean().detach, Gate().detach, Pairwise().detach
    (True, True, True)
"""
from .accuracy_weighted import AccuracyWeighted
from .base import Aggregator, AggregatorError, KDTerm, Targets
from .compose import Compose
from .feature_fusion import FeatureFusion
from .gate import Gate
from .hierarchical_ta import HierarchicalTA
from .hybrid import HybridTeacher
from .mean import Mean
from .pairwise import Pairwise
from .peer_attention import PeerAttention
from .peer_mean import PeerMean
from .temporal_peers import PeerTemporalMean
from .weighted_mean import MinLogit, WeightedMean, fit_ensemble_weights

__all__ = ["AccuracyWeighted", "Aggregator", "AggregatorError", "Compose", "FeatureFusion", "Gate", "HierarchicalTA",
           "HybridTeacher", "KDTerm", "Mean", "MinLogit", "Pairwise", "PeerAttention", "PeerMean", "PeerTemporalMean",
           "Targets", "WeightedMean", "fit_ensemble_weights"]
