"""Losses: contrastive (InfoNCE / SigLIP over all ranks) and the fusion head's matching loss."""

from accord.losses.contrastive import ContrastiveLoss, LossConfig, gather_with_grad
from accord.losses.matching import MatchingLoss, sample_negatives

__all__ = ["ContrastiveLoss", "LossConfig", "MatchingLoss", "gather_with_grad", "sample_negatives"]
