"""Losses: contrastive (InfoNCE / SigLIP over all ranks), the fusion head's matching loss and the generative head's
caption loss."""

from accord.losses.captioning import CaptionLoss
from accord.losses.contrastive import ContrastiveLoss, LossConfig, gather_with_grad
from accord.losses.matching import MatchingLoss, sample_negatives

__all__ = ["CaptionLoss", "ContrastiveLoss", "LossConfig", "MatchingLoss", "gather_with_grad", "sample_negatives"]
