"""The one training config: data, towers, loss, optimiser, schedule, DeepSpeed, logging, checkpoints, eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from accord.config import ConfigError
from accord.data.config import DataConfig
from accord.losses.contrastive import LossConfig
from accord.models.config import ModelConfig


@dataclass
class OptimConfig:
    """AdamW and its schedule: linear warmup, then cosine decay."""

    lr: float = 5e-4
    """Peak learning rate (per-tower multiples: ``model.towers.<m>.lr_scale``)."""
    weight_decay: float = 0.2
    """Decoupled weight decay; norms, biases, embeddings and temperatures get none."""
    no_decay: list[str] = field(default_factory=list)
    """More parameters without weight decay: fnmatch patterns of their names (``towers.image.backbone.*``,
    ``*.proj.weight``; ``accord train --print-config`` does not list names, ``model.named_parameters()`` does)."""
    layer_decay: float | None = None
    """Layer-wise lr decay of the towers' backbones (BEiT / EVA fine-tuning): a parameter at depth d of a backbone
    with L blocks learns at ``lr x layer_decay ** (L + 1 - d)`` (embeddings d = 0, block i d = i + 1, after the last
    block d = L + 1), times the tower's ``lr_scale``; null: no decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's betas (CLIP's)."""
    eps: float = 1e-6
    """Adam's epsilon."""
    warmup_steps: int = 100
    """Optimiser steps of linear warmup from 0."""
    schedule: Literal["cosine", "const", "const-cooldown"] = "cosine"
    """After warmup: cosine decay to ``lr`` x ``min_lr_ratio`` at the last step; constant; or constant, then over the
    last ``cooldown_fraction`` of the steps a decay to ``lr`` x ``min_lr_ratio`` (open_clip's schedulers)."""
    min_lr_ratio: float = 0.0
    """The decay's floor: ``lr`` x this at the last step (cosine, const-cooldown)."""
    cooldown_fraction: float = 0.1
    """const-cooldown: the share of the run's steps, at its end, over which the learning rate decays."""
    cooldown_power: float = 1.0
    """const-cooldown: the decay's shape, ``(1 - progress) ** power`` (1: linear)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; null: no clipping."""
    fused: bool | None = None
    """torch's fused AdamW kernel (one kernel over all parameters); null: on CUDA yes, on CPU no. Not with
    ``deepspeed.offload_optimizer`` (DeepSpeed's CPU Adam)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.lr <= 0:
            raise ConfigError(f"{dot}lr: must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"{dot}warmup_steps: must be >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{dot}layer_decay: must be in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{dot}min_lr_ratio: must be in [0, 1]")
        if not 0 < self.cooldown_fraction <= 1 or self.cooldown_power <= 0:
            raise ConfigError(f"{dot}cooldown_fraction / {dot}cooldown_power: must be in (0, 1] / > 0")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards and runs the model (``accord.train.ds_config`` writes its JSON)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimiser states, 2 + gradients, 3 + parameters partitioned."""
    precision: Literal["fp32", "bf16", "fp16", "autocast_bf16"] = "bf16"
    """Tower precision: bf16 / fp16 are DeepSpeed's (weights and activations in half precision, fp32 master
    weights); autocast_bf16 keeps fp32 weights and runs matmuls in bf16 under torch.autocast (DeepSpeed's
    ``torch_autocast``). The loss is computed in fp32 in every case; fp16 is refused on CPU."""
    offload_optimizer: bool = False
    """Keep optimiser states in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged into the generated DeepSpeed JSON, key by key at the top level (last word)."""


@dataclass
class CompileConfig:
    """``torch.compile`` of every tower's backbone (``nn.Module.compile``: parameter names and checkpoints stay as
    they are); the first steps pay the compilation."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode."""
    dynamic: bool | None = None
    """Dynamic shapes: null lets torch mark a dimension dynamic once it changes (caption lengths do)."""
    backend: str = "inductor"
    """torch.compile's backend (``aot_eager`` traces without generating kernels: quick, for checks)."""
    fullgraph: bool = False
    """Fail on a graph break instead of running the rest eagerly."""


@dataclass
class CudaConfig:
    """CUDA settings applied at start (ignored on CPU)."""

    tf32: bool = True
    """TF32 matmuls and convolutions for fp32 work (``torch.backends.cuda.matmul.allow_tf32``)."""
    cudnn_benchmark: bool = True
    """cuDNN picks the fastest convolution algorithm per input shape (the towers' shapes are fixed)."""


@dataclass
class LogConfig:
    """What is logged where: console, ``output_dir/metrics.jsonl``, wandb, TensorBoard, MLflow; profiling."""

    every: int = 10
    """Optimiser steps per logged row of metrics (and at the last step)."""
    console_every: int | None = None
    """Optimiser steps per console line (and at the last step); null: every logged row. Each line shows the last
    ``every`` steps."""
    wandb: bool = False
    """Log to wandb (offline unless ``wandb_online``)."""
    wandb_online: bool = False
    """Sync wandb to its server while training."""
    wandb_project: str = "accord"
    """wandb project name."""
    run_name: str | None = None
    """wandb and MLflow run name."""
    tensorboard: bool = False
    """Event files in ``output_dir/tensorboard`` with the metric names of metrics.jsonl."""
    mlflow: bool = False
    """Log the run (its config as params, the metric names of metrics.jsonl) to MLflow; a resumed run continues its
    MLflow run. Needs ``pip install 'accord[mlflow]'``."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (``sqlite:///runs.db``, ``http://server:5000``); null: ``sqlite:///OUTPUT_DIR/mlflow.db``,
    no server needed."""
    mlflow_experiment: str = "accord"
    """MLflow experiment name (created when missing)."""
    sample_keys: bool = False
    """Write ``output_dir/samples/rank<R>.jsonl``: every step's samples as ``shard/key``, per rank (an audit trail)."""
    profile_start: int | None = None
    """Run torch.profiler over steps [start, start + profile_steps): traces and a per-stage table."""
    profile_steps: int = 5
    """Steps in the profiled window."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console: a progress bar of steps (loss, samples/s) with the log lines above it, or the log lines only;
    auto: the bar when rank 0's stdout is a terminal."""
    peak_tflops: float | None = None
    """The device's peak dense TFLOP/s for ``perf/mfu``; null: from accord.train.flops's table of known GPUs (no MFU
    where the device is not in it, as on CPU)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.every < 1:
            raise ConfigError(f"{dot}every: must be >= 1")
        if self.console_every is not None and self.console_every < 1:
            raise ConfigError(f"{dot}console_every: must be >= 1")
        if self.profile_start is not None and (self.profile_start < 1 or self.profile_steps < 1):
            raise ConfigError(f"{dot}profile_start / {dot}profile_steps: must be >= 1")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept (``accord.train.checkpoint``)."""

    every: int = 500
    """Optimiser steps between checkpoints; a final one is always written."""
    keep_last: int = 3
    """Committed checkpoints kept (older ones are deleted); 0 keeps all."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.every < 1:
            raise ConfigError(f"{dot}every: must be >= 1 (a final checkpoint is always written)")
        if self.keep_last < 0:
            raise ConfigError(f"{dot}keep_last: must be >= 0")


@dataclass
class ZeroShotConfig:
    """Zero-shot classification of data.val in every evaluation (as open_clip's ``--zeroshot-frequency``): class
    names and prompt templates, labels from a field of each sample's json (a class name or its index)."""

    classes: str
    """A text file, one class name per line."""
    templates: str | None = None
    """A text file, one prompt per line with ``{}`` for the class; default: one per modality ("a photo of a {}.")."""
    label_key: str = "label"
    """The field of each sample's json that holds its class."""
    modality: Literal["image", "video", "audio"] | None = None
    """The medium to classify; default: the one non-text tower."""

    def validate(self, prefix: str = "") -> None:
        for name in ("classes", "templates"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{prefix}.{name}: {path} is not a file")


@dataclass
class CompositionalConfig:
    """Compositional evaluation of data.val in every evaluation (``accord.evaluation.compositional``): each caption
    against its one-edit negatives per category, beside blind text-only baselines. data.val and data.train must be
    shard folders."""

    train_captions: int = 10000
    """Captions of data.train read once at start: the negatives' vocabulary and the blind baselines' training text."""
    max_samples: int | None = 2000
    """Evaluate on at most this many samples of data.val (every rank scores the same ones)."""

    def validate(self, prefix: str = "") -> None:
        if self.train_captions < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ConfigError(f"{prefix}.train_captions / {prefix}.max_samples: must be >= 0 / >= 1")


@dataclass
class EvalConfig:
    """Periodic evaluation on ``data.val`` (``accord.train.validate``)."""

    every: int = 0
    """Optimiser steps between evaluations; 0: only at the end (when data.val is set)."""
    max_samples: int | None = None
    """Evaluate on at most this many samples (all ranks)."""
    zeroshot: ZeroShotConfig | None = None
    """Zero-shot classification besides retrieval."""
    compositional: CompositionalConfig | None = None
    """Compositional evaluation (captions against their one-edit negatives) besides retrieval."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.every < 0:
            raise ConfigError(f"{dot}every: must be >= 0")


@dataclass
class TrainConfig:
    """Everything one ``accord train`` run needs; YAML plus ``key=value`` overrides (``accord.config``)."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compile: CompileConfig | None = None
    """Compile the towers (``compile={}`` for the defaults)."""
    cuda: CudaConfig = field(default_factory=CudaConfig)
    """TF32 and cuDNN autotuning on CUDA machines."""
    output_dir: str = "runs/accord"
    """Where the run writes config.json, metrics.jsonl, ranks.json and checkpoints/ (shared by all nodes)."""
    epochs: int = 1
    """Passes over data.train (an epoch ends when every rank is out of samples)."""
    max_steps: int | None = None
    """Optimiser steps to train instead of ``epochs``."""
    accum_steps: int = 1
    """Micro-batches per optimiser step; features are cached so the contrastive batch is k times larger (exact)."""
    seed: int = 0
    """Seeds the initial weights (identical on every rank) and each rank's random streams."""
    dist_timeout_s: float = 1800.0
    """Bound on every collective: a lost or stalled rank ends the run after this many seconds, naming the rank."""

    def validate(self, prefix: str = "") -> None:
        if self.accum_steps < 1:
            raise ConfigError("accum_steps: must be >= 1")
        if self.dist_timeout_s <= 0:
            raise ConfigError("dist_timeout_s: must be > 0 (seconds)")
        if self.data.worker_timeout_s and self.data.worker_timeout_s >= self.dist_timeout_s:
            raise ConfigError(
                f"data.worker_timeout_s: {self.data.worker_timeout_s:g} s must be below dist_timeout_s "
                f"({self.dist_timeout_s:g} s), or the other ranks time out first and cannot tell a stalled data worker "
                "from the network"
            )
        if self.epochs < 1 and self.max_steps is None:
            raise ConfigError("epochs: must be >= 1 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps: must be >= 1")
        if self.loss.kind == "siglip" and self.model.init_logit_bias is None:
            raise ConfigError("model.init_logit_bias: the siglip loss needs a logit bias (e.g. -10)")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params: needs deepspeed.zero_stage 3")
        if self.data.synthetic and self.max_steps is None:
            raise ConfigError("data.synthetic: synthetic batches have no epochs: set max_steps")
        if self.data.train is None and not self.data.synthetic:
            raise ConfigError("data.train: no training shards given")
        if self.compile is not None and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "compile: not with deepspeed.zero_stage 3 (its parameter hooks break the compiled graphs); "
                "use stage 0-2"
            )
        if self.optim.fused and self.deepspeed.offload_optimizer:
            raise ConfigError("optim.fused: not with deepspeed.offload_optimizer (DeepSpeed's CPU Adam runs the step)")
        if "text" in self.model.towers and not self.data.text.tokenizer and not self.data.synthetic:
            raise ConfigError("data.text.tokenizer: the text tower needs a local tokenizer directory")
        if self.loss.hard_negatives is not None and "text" not in self.model.towers:
            raise ConfigError("loss.hard_negatives: needs a text tower (the negatives are edited captions)")
        if self.eval.compositional is not None:
            if "text" not in self.model.towers:
                raise ConfigError("eval.compositional: needs a text tower (captions are text)")
            if self.data.val is None:
                raise ConfigError("eval.compositional: needs data.val (the samples to evaluate)")
        gen = self.model.generative
        if gen is not None and "text" in self.model.towers and self.data.text.max_length > gen.max_length:
            raise ConfigError(
                f"model.generative.max_length: {gen.max_length} positions, but data.text.max_length gives captions "
                f"of up to {self.data.text.max_length} tokens"
            )
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
