"""Typed configs of the streaming data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from accord.config import ConfigError, parse_bytes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextConfig:
    """How captions become token ids."""

    tokenizer: str | None = None
    """Local HF tokenizer directory (or ``pkg:NAME/dir``); required when a text tower is trained."""
    max_length: int = 77
    """Tokens per caption; longer captions are truncated."""


@dataclass
class ImageConfig:
    """Image preprocessing: random resized crop when training, resize + centre crop when evaluating."""

    size: int = 224
    """Side of the square the tower sees, in pixels."""
    train_scale: tuple[float, float] = (0.9, 1.0)
    """RandomResizedCrop area range when training (open_clip's default)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel normalisation mean (CLIP's)."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel normalisation std (CLIP's)."""


@dataclass
class VideoConfig:
    """Which frames of a clip are decoded, and at what size."""

    num_frames: int = 8
    """Frames per clip."""
    size: int = 224
    """Side of each square frame, in pixels."""
    sampling: Literal["uniform", "random_segment", "fps"] = "uniform"
    """Training frame choice: segment centres, a random frame per segment, or a fixed rate; evaluation is uniform."""
    fps: float | None = None
    """Frames per second for ``sampling: fps``."""
    backend: Literal["decord", "torchcodec", "pyav"] = "decord"
    """Video decoder."""


@dataclass
class AudioConfig:
    """Waveform -> fixed-length filterbank features."""

    sample_rate: int = 16000
    """Rate the waveform is resampled to, in Hz."""
    seconds: float = 10.0
    """Fixed length: a random (training) or centre (evaluation) crop, zero padding when shorter."""
    features: Literal["fbank", "logmel"] = "fbank"
    """Kaldi filterbank (AST) or log-mel spectrogram."""
    n_mels: int = 128
    """Mel bins per frame."""
    num_frames: int | None = None
    """Feature frames per clip; default ``seconds`` / 10 ms."""
    normalize_mean: float = -4.27
    """Feature normalisation mean (AST's AudioSet statistics)."""
    normalize_std: float = 4.57
    """Feature normalisation std (AST's AudioSet statistics)."""


@dataclass
class DataConfig:
    """Where shards come from, how they are split and decoded, and the per-rank micro-batch size."""

    train: str | None = None
    """Training shards: a folder, a brace pattern (``dir/shard-{000000..000031}.tar``), a ``pipe:`` command or an
    fsspec URL; several sources joined with ``::``."""
    weights: list[float] | None = None
    """One sampling weight per ``::``-joined source (resampled mode)."""
    val: str | None = None
    """Validation shards (same forms as ``train``), evaluated every ``eval.every`` steps and at the end."""
    mode: Literal["finite", "resampled"] = "finite"
    """finite: every sample once per epoch; resampled: shards drawn with replacement."""
    batch_size: int = 32
    """Micro-batch per rank."""
    workers: int = 2
    """Data-loader worker processes per rank (0: load in the training process)."""
    seed: int = 0
    """Seeds the shard order, the shuffle buffers and the per-sample random crops."""
    shuffle: bool = True
    """Shuffle the shard order per epoch and samples through a per-shard buffer."""
    shuffle_buffer: int = 1000
    """Samples in each shuffle buffer."""
    epoch_samples: int | None = None
    """Resampled mode: samples per epoch over all ranks; default the dataset size."""
    max_bad_fraction: float = 0.05
    """Stop the run when more of the samples seen are bad (checked after ``min_samples_for_check``)."""
    min_samples_for_check: int = 200
    """Samples seen before ``max_bad_fraction`` is checked."""
    persistent_workers: bool = True
    """Keep data workers alive across epochs."""
    worker_timeout_s: float | None = None
    """Seconds a data worker may take for one batch (its first: start-up and shuffle buffer included) before its rank
    stops, naming it (a hung read or decode); 0: wait forever; default in training: half of ``dist_timeout_s`` (the
    stalled rank exits before the others' collective times out)."""
    start_method: Literal["auto", "forkserver", "spawn", "fork"] = "auto"
    """How data workers start; auto: fork, but forkserver when audio is loaded (torchaudio in forked workers can
    deadlock)."""
    io_retries: int = 5
    """Remote shards (URLs, ``pipe:``): faults in a row (reset, refused, stall, 5xx, a pipe's non-zero exit) after
    which a shard is given up on; each reopens the shard at the byte already read, so no sample is lost or repeated."""
    io_timeout_s: float = 60.0
    """Seconds a remote read may deliver nothing before it counts as a stall (a fault, retried); 0: wait forever."""
    io_backoff_s: float = 1.0
    """Wait before the first retry; doubled per fault in a row (with jitter, at most 30 s)."""
    cache_dir: str | None = None
    """Node-local folder where remote shards (URLs, ``pipe:``) are downloaded once and read from while they stay,
    shared by the node's ranks and data workers; the next shard of each worker is downloaded ahead. None: stream."""
    cache_limit: int | str | None = None
    """Bytes the cache may hold (``20GB``, ``512MiB``); least recently used shards no one reads are evicted. It must
    hold the shards in flight (2 per data worker of every rank of the node): checked at start. None: no limit."""
    counterfactuals: bool = False
    """Training: a sample's counterfactual pair (members ``counterfactual.<ext>`` + ``counterfactual.txt``: its medium
    with one thing changed, and that medium's caption; the captioning world renders them) joins its batch as one more
    sample, so that each is the other's hardest negative in both directions of the contrastive loss (TripletCLIP's
    rendered negatives). A batch of ``batch_size`` samples then holds 2 x ``batch_size`` rows; samples without a pair
    have an absent row. Evaluation never reads them."""
    synthetic: bool = False
    """Random batches of the configured shapes instead of shards (every modality present, captions of
    ``text.max_length`` tokens), made on the training device: measures the step alone. Needs ``max_steps``."""
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
        if self.worker_timeout_s is not None and self.worker_timeout_s < 0:
            raise ConfigError(f"{dot}worker_timeout_s: must be >= 0 (seconds; 0: no timeout)")
        if self.cache_limit is not None:
            if parse_bytes(self.cache_limit, f"{dot}cache_limit") <= 0:
                raise ConfigError(f"{dot}cache_limit: must be > 0")
            if self.cache_dir is None:
                raise ConfigError(f"{dot}cache_limit: needs {dot}cache_dir")
        for key in ("io_retries", "io_timeout_s", "io_backoff_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{dot}{key}: must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{dot}max_bad_fraction: must be in [0, 1]")
        if self.counterfactuals and self.synthetic:
            raise ConfigError(f"{dot}counterfactuals: not with {dot}synthetic (random batches have no pairs)")
        if self.weights is not None:
            if self.train is None or len(self.weights) != len(self.train.split("::")):
                raise ConfigError(f"{dot}weights: needs one weight per '::'-joined source of {dot}train")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"{dot}weights: must be >= 0 with a positive sum")
        if self.video.sampling == "fps" and not self.video.fps:
            raise ConfigError(f"{dot}video.fps: needed for video.sampling 'fps'")
