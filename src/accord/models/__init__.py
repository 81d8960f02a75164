"""Tower encoders and the multi-tower model."""

from accord.models.config import ModelConfig, TowerConfig
from accord.models.model import AccordModel, ModelOutput
from accord.models.towers import Tower

__all__ = ["AccordModel", "ModelConfig", "ModelOutput", "Tower", "TowerConfig"]
