"""AdamW parameter groups and the learning-rate schedule (warmup, then cosine, constant or constant + cooldown)."""

from __future__ import annotations

import fnmatch
import math

from torch import nn

from accord.models.towers import layer_depths
from accord.train.config import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, embeddings and temperatures are not weight-decayed (as in CLIP / open_clip)."""
    lowered = name.lower()
    return (
        param.ndim < 2
        or "norm" in lowered
        or lowered.endswith(".bias")
        or "embedding" in lowered
        or "logit_scale" in lowered
        or "logit_bias" in lowered
        or lowered.endswith((".pos", ".query"))
    )


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Decayed and not-decayed parameters (``no_decay`` and ``cfg.no_decay``'s patterns), split further by their
    learning-rate scale: their tower's ``lr_scale`` (a pretrained tower tuned at a fraction of the learning rate)
    times, with ``cfg.layer_decay``, their depth's factor; each group carries its ``lr_scale`` for the schedule."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    towers = dict(getattr(model, "towers", {}).items())
    scales = {f"towers.{m}.backbone.": t.cfg.lr_scale for m, t in towers.items()}
    depth_factor: dict[int, float] = {}
    if cfg.layer_decay is not None:
        for tower in towers.values():
            depths, blocks = layer_depths(tower.backbone)
            depth_factor.update({pid: cfg.layer_decay ** (blocks + 1 - d) for pid, d in depths.items()})
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # shared backbones appear under two names
            continue
        seen.add(id(p))
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0) * depth_factor.get(id(p), 1.0)
        plain = no_decay(name, p) or any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.no_decay)
        groups.setdefault((plain, scale), []).append(p)
    groups.setdefault((False, 1.0), [])
    groups.setdefault((True, 1.0), [])
    return [
        {"params": params, "weight_decay": 0.0 if plain else cfg.weight_decay, "lr_scale": scale}
        for (plain, scale), params in sorted(groups.items())
    ]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then ``cfg.schedule``: cosine decay to ``lr * min_lr_ratio`` at the last
    step (the 0-based ``step`` = ``total_steps - 1``); constant; or constant until the last ``cooldown_fraction`` of
    the steps, then ``floor + (lr - floor) * (1 - progress) ** cooldown_power`` down to the floor at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "const":
        return cfg.lr
    if cfg.schedule == "const-cooldown":
        cooldown = max(1, round(cfg.cooldown_fraction * total_steps))
        start = max(cfg.warmup_steps, total_steps - cooldown)
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start) / max(1, total_steps - 1 - start))
        return floor + (cfg.lr - floor) * (1 - progress) ** cfg.cooldown_power
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
