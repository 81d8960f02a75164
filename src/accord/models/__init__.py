"""Tower encoders and the multi-tower model."""

from accord.models.config import MODALITIES, ModelConfig, TowerConfig
from accord.models.model import AccordModel, ModelOutput
from accord.models.towers import Tower

__all__ = ["MODALITIES", "AccordModel", "ModelConfig", "ModelOutput", "Tower", "TowerConfig"]
