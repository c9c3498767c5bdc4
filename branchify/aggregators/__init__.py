"""Aggregators: turn a branched forward into teacher targets (one module per method).

Examples:
    >>> from branchify.aggregators import Gate, Mean, Pairwise
    >>> Mean().detach, Gate().detach, Pairwise().detach
    (True, True, True)
"""
from branchify.aggregators.accuracy_weighted import AccuracyWeighted
from branchify.aggregators.base import Aggregator, AggregatorError, KDTerm, Targets
from branchify.aggregators.compose import Compose
from branchify.aggregators.feature_fusion import FeatureFusion
from branchify.aggregators.gate import Gate
from branchify.aggregators.hierarchical_ta import HierarchicalTA
from branchify.aggregators.hybrid import HybridTeacher
from branchify.aggregators.mean import Mean
from branchify.aggregators.pairwise import Pairwise
from branchify.aggregators.peer_attention import PeerAttention
from branchify.aggregators.peer_mean import PeerMean
from branchify.aggregators.temporal_peers import PeerTemporalMean
from branchify.aggregators.weighted_mean import MinLogit, WeightedMean, fit_ensemble_weights

__all__ = ["AccuracyWeighted", "Aggregator", "AggregatorError", "Compose", "FeatureFusion", "Gate", "HierarchicalTA",
           "HybridTeacher", "KDTerm", "Mean", "MinLogit", "Pairwise", "PeerAttention", "PeerMean", "PeerTemporalMean",
           "Targets", "WeightedMean", "fit_ensemble_weights"]
