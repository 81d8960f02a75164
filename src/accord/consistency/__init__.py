"""Export of trained encoders and the cross-modal consistency score."""

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
