"""A tiny random accord backbone exported with save_backbone, from a shipped config."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from accord.config import from_dict
from accord.consistency.export import save_backbone
from accord.models import AccordModel
from accord.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def random_backbone(config: str, out: Path, seed: int = 0) -> Path:
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    data["data"]["train"] = "unused"
    cfg = from_dict(TrainConfig, data)
    torch.manual_seed(seed)
    save_backbone(AccordModel(cfg.model), cfg, out)
    return out
