"""The cross-modal consistency score: the backbone directory (save, load), scoring, the score as a loss and metric."""

from accord.consistency.backbone import Backbone, HFClipBackbone, load_backbone
from accord.consistency.metric import ConsistencyMetric
from accord.consistency.scorer import ConsistencyLoss, ConsistencyScorer, ScoreResult, torchmetrics_aggregate

__all__ = [
    "Backbone",
    "ConsistencyLoss",
    "ConsistencyMetric",
    "ConsistencyScorer",
    "HFClipBackbone",
    "ScoreResult",
    "load_backbone",
    "torchmetrics_aggregate",
]
