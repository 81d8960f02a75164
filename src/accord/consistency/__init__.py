"""The cross-modal consistency score: the backbone directory (save, load), scoring, the score as a loss and metric."""

import importlib
from typing import Any

from accord.consistency.backbone import Backbone, HFClipBackbone, load_backbone
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


def __getattr__(name: str) -> Any:
    """``ConsistencyMetric`` on first use: torchmetrics takes 2 s to import, which every training rank and command
    that reaches this package (for the backbone) would otherwise pay without using it."""
    if name == "ConsistencyMetric":
        return importlib.import_module("accord.consistency.metric").ConsistencyMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
