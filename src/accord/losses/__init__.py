"""Contrastive losses (one file: contrastive.py)."""

from accord.losses.contrastive import ContrastiveLoss, LossConfig, gather_with_grad

__all__ = ["ContrastiveLoss", "LossConfig", "gather_with_grad"]
