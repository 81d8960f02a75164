"""The one training config: data, towers, loss, optimiser, schedule, DeepSpeed, logging, checkpoints, eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from accord.config import ConfigError
from accord.data.config import DataConfig
from accord.losses.contrastive import LossConfig
from accord.models.config import ModelConfig


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class LogConfig:
    every: int = 10
    wandb: bool = False
    wandb_online: bool = False
    wandb_project: str = "accord"
    run_name: str | None = None
    tensorboard: bool = False  # event files in <output_dir>/tensorboard, the metric names of metrics.jsonl
    sample_keys: bool = False  # write samples/rank<R>.jsonl: the sample keys of every step, per rank
    profile_start: int | None = None  # torch.profiler over steps [start, start + profile_steps): traces + stage table
    profile_steps: int = 5

    def validate(self, prefix: str = "") -> None:
        if self.every < 1:
            raise ConfigError("log.every: must be >= 1")
        if self.profile_start is not None and (self.profile_start < 1 or self.profile_steps < 1):
            raise ConfigError("log.profile_start / log.profile_steps: must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 500  # optimiser steps; a final checkpoint is always written
    keep_last: int = 3


@dataclass
class ZeroShotConfig:
    """Zero-shot classification of data.val in every evaluation (as open_clip's ``--zeroshot-frequency``): class
    names and prompt templates, labels from a field of each sample's json (a class name or its index)."""

    classes: str  # a text file, one class name per line
    templates: str | None = None  # a text file, one "a photo of a {}." per line; default: one per modality
    label_key: str = "label"
    modality: Literal["image", "video", "audio"] | None = None  # default: the one non-text tower

    def validate(self, prefix: str = "") -> None:
        from pathlib import Path

        for name in ("classes", "templates"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{prefix}.{name}: {path} is not a file")


@dataclass
class EvalConfig:
    every: int = 0  # optimiser steps; 0 = only at the end (if data.val is set)
    max_samples: int | None = None
    zeroshot: ZeroShotConfig | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/accord"
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs
    accum_steps: int = 1  # micro-batches per optimiser step (features cached, so the contrastive batch is k x)
    seed: int = 0
    dist_timeout_s: float = 1800.0  # bound on every collective: a lost or stalled rank ends the run after this

    def validate(self, prefix: str = "") -> None:
        if self.accum_steps < 1:
            raise ConfigError("accum_steps: must be >= 1")
        if self.dist_timeout_s <= 0:
            raise ConfigError("dist_timeout_s: must be > 0 (seconds)")
        if self.epochs < 1 and self.max_steps is None:
            raise ConfigError("epochs: must be >= 1 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps: must be >= 1")
        if self.loss.kind == "siglip" and self.model.init_logit_bias is None:
            raise ConfigError("model.init_logit_bias: the siglip loss needs a logit bias (e.g. -10)")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params: needs deepspeed.zero_stage 3")
        if self.data.train is None:
            raise ConfigError("data.train: no training shards given")
        if "text" in self.model.towers and not self.data.text.tokenizer:
            raise ConfigError("data.text.tokenizer: the text tower needs a local tokenizer directory")
        zeroshot = self.eval.zeroshot
        if zeroshot is not None:
            media = [m for m in self.model.towers if m != "text"]
            if "text" not in self.model.towers:
                raise ConfigError("eval.zeroshot: needs a text tower (class prompts are text)")
            if self.data.val is None:
                raise ConfigError("eval.zeroshot: needs data.val (the samples to classify)")
            if zeroshot.modality is None and len(media) != 1:
                raise ConfigError(f"eval.zeroshot.modality: say which of {', '.join(media)} to classify")
            if zeroshot.modality is not None and zeroshot.modality not in media:
                raise ConfigError(f"eval.zeroshot.modality: no {zeroshot.modality} tower ({', '.join(media)})")
        unknown = sorted(set(self.loss.pair_weights) - {f"{a}-{b}" for a, b in self.model.pair_list()})
        if unknown:
            raise ConfigError(
                f"loss.pair_weights.{unknown[0]}: not a trained pair "
                f"({', '.join(f'{a}-{b}' for a, b in self.model.pair_list())})"
            )

    def check_device(self, device_type: str) -> None:
        """Checks that depend on the machine the run starts on."""
        if device_type == "cpu" and self.deepspeed.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 is not supported on CPU; use bf16 or fp32")
