"""The DeepSpeed JSON of a training config: ZeRO stage and offload, precision (DeepSpeed bf16 / fp16 or torch autocast),
AdamW (fused or not), micro-batch and accumulation."""

from __future__ import annotations

from typing import Any

from accord.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON of a config on a ``device_type`` machine (``deepspeed.extra`` merged last, key by key at
    the top level)."""
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
        optim_params["torch_adam"] = True  # torch's AdamW: no fused_adam JIT build
        fused = cfg.optim.fused if cfg.optim.fused is not None else device_type == "cuda"
        if fused:
            optim_params["fused"] = True  # passed on to torch.optim.AdamW
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
    if ds.precision == "autocast_bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.optim.grad_clip:
        config["gradient_clipping"] = cfg.optim.grad_clip
    return {**config, **ds.extra}
