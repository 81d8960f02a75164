"""The DeepSpeed JSON of a training config: ZeRO stage and offload, precision, AdamW, micro-batch and accumulation."""

from __future__ import annotations

from typing import Any

from accord.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON of a config (``deepspeed.extra`` merged last, key by key at the top level)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    optim_params = {
        "lr": cfg.optim.lr,
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
    }
    if not ds.offload_optimizer:
        optim_params["torch_adam"] = True  # no fused_adam JIT build
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.accum_steps,
        "optimizer": {"type": "AdamW", "params": optim_params},
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip:
        config["gradient_clipping"] = cfg.optim.grad_clip
    return {**config, **ds.extra}
