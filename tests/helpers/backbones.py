"""Tiny random accord models and backbones from the shipped configs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from accord.config import apply_overrides, from_dict
from accord.consistency.backbone import save_backbone
from accord.models import AccordModel
from accord.resources import config_file
from accord.train.config import TrainConfig

# configs/tiny.yaml with CLIP-kind text and image towers (the sizes of tiny.yaml's towers)
CLIP_TOWERS = [
    "model.towers.text.kind=clip_text",
    "model.towers.text.hf.eos_token_id=102",
    "model.towers.text.hf.pad_token_id=0",
    "model.towers.text.hf.bos_token_id=101",
    "model.towers.image.kind=clip_vision",
]


def tiny_config(config: str = "tiny.yaml", overrides: list[str] | None = None) -> TrainConfig:
    data = yaml.safe_load(config_file(config).read_text())
    data["data"]["train"] = "unused"
    return from_dict(TrainConfig, apply_overrides(data, overrides or []))


def random_model(cfg: TrainConfig, seed: int = 0) -> AccordModel:
    torch.manual_seed(seed)
    return AccordModel(cfg.model)


def random_backbone(config: str, out: Path, seed: int = 0, overrides: list[str] | None = None) -> Path:
    cfg = tiny_config(config, overrides)
    save_backbone(random_model(cfg, seed), cfg.data, out)
    return out
