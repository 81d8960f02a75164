"""Typed configs of the streaming data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from accord.config import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextConfig:
    tokenizer: str | None = None  # local HF tokenizer dir (or pkg:NAME/dir); required when text is loaded
    max_length: int = 77


@dataclass
class ImageConfig:
    size: int = 224
    train_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's default)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class VideoConfig:
    num_frames: int = 8
    size: int = 224
    sampling: Literal["uniform", "random_segment", "fps"] = "uniform"  # train; eval always uniform
    fps: float | None = None  # sampling: fps
    backend: Literal["decord", "torchcodec", "pyav"] = "decord"


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    seconds: float = 10.0  # fixed length: random crop (train) / centre crop (eval), zero pad
    features: Literal["fbank", "logmel"] = "fbank"
    n_mels: int = 128
    num_frames: int | None = None  # feature frames; default seconds / 10 ms
    normalize_mean: float = -4.27  # AST's AudioSet statistics
    normalize_std: float = 4.57


@dataclass
class DataConfig:
    """Where shards come from, how they are split and decoded, and the per-rank micro-batch size."""

    train: str | None = None  # "dir/", "dir/shard-{000000..000031}.tar", several joined with "::"
    weights: list[float] | None = None  # per source, resampled mode
    val: str | None = None
    mode: Literal["finite", "resampled"] = "finite"
    batch_size: int = 32  # per rank
    workers: int = 2
    seed: int = 0
    shuffle: bool = True  # shard order per epoch + a per-shard sample shuffle buffer
    shuffle_buffer: int = 1000
    epoch_samples: int | None = None  # resampled: samples per epoch (all ranks); default: dataset size
    max_bad_fraction: float = 0.05  # stop when more of the samples seen are bad (after min_samples_for_check)
    min_samples_for_check: int = 200
    persistent_workers: bool = True
    # auto: fork (fast start), but forkserver when audio is loaded (torchaudio in forked workers can deadlock)
    start_method: Literal["auto", "forkserver", "spawn", "fork"] = "auto"
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.batch_size < 1:
            raise ConfigError(f"{dot}batch_size: must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"{dot}workers: must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{dot}max_bad_fraction: must be in [0, 1]")
        if self.weights is not None:
            if self.train is None or len(self.weights) != len(self.train.split("::")):
                raise ConfigError(f"{dot}weights: needs one weight per '::'-joined source of {dot}train")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"{dot}weights: must be >= 0 with a positive sum")
        if self.video.sampling == "fps" and not self.video.fps:
            raise ConfigError(f"{dot}video.fps: needed for video.sampling 'fps'")
