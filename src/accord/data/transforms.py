"""Per-sample decoding + transforms: shard members (bytes) -> model inputs for each modality.

Random choices (crops, frame offsets) come from a ``random.Random`` seeded per sample from (seed, epoch, key), so
a sample is transformed identically whichever worker, rank or resumed run handles it.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from accord.data.config import AudioConfig, DataConfig, ImageConfig, VideoConfig
from accord.data.decode import decode_audio, decode_image, decode_video, uniform_indices
from accord.data.negatives import NegativeSampler
from accord.modalities import COUNTERFACTUAL, member_of
from accord.resources import resolve_local_dir


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is counted in the loader's skip statistics."""

    def __init__(self, reason: str, bad: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.bad = bad  # False: filtered on purpose (e.g. none of the trained modalities), not an error


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float [..., 3, H, W] in [0, 1] -> normalised."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def random_resized_crop_box(
    w: int, h: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, width, height) as torchvision's RandomResizedCrop.get_params, from ``rng``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    side = min(w, h)  # fallback: centre crop
    return (w - side) // 2, (h - side) // 2, side, side


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """[..., H, W] -> [..., S, S]: resize the shorter side to S (bicubic, antialiased), then centre crop with the
    offset rounded down, as transformers' image processors crop (torchvision's center_crop rounds half to even,
    which shifts some odd-margin images by a pixel): accord's eval, its scorer and an exported CLIP processor see
    the same pixels."""
    import torchvision.transforms.v2.functional as TF

    img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    h, w = img.shape[-2:]
    return TF.crop(img, (h - size) // 2, (w - size) // 2, size, size)


def image_to_tensor(img: torch.Tensor, cfg: ImageConfig, train: bool, rng: random.Random) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [3, S, S]. Train: random resized crop; eval: resize the shorter side
    to S and centre crop (:func:`resize_center_crop`). Bicubic with antialiasing, on the tensor (faster than PIL)."""
    import torchvision.transforms.v2.functional as TF

    s = cfg.size
    h, w = img.shape[-2:]
    if train:
        left, top, cw, ch = random_resized_crop_box(w, h, cfg.train_scale, rng)
        img = TF.resized_crop(
            img, top, left, ch, cw, [s, s], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
        )
    else:
        img = resize_center_crop(img, s)
    return normalize(img.float() / 255.0, cfg.mean, cfg.std)


def frame_sampler(cfg: VideoConfig, train: bool, rng: random.Random):
    """Index picker for decode_video: uniform (eval), random position per segment, or fixed fps."""
    n = cfg.num_frames

    def pick(total: int, fps: float) -> list[int]:
        if total <= 0:
            raise ValueError("video has no frames")
        if not train or cfg.sampling == "uniform":
            return uniform_indices(total, n)
        if cfg.sampling == "random_segment":
            return [min(total - 1, int(rng.uniform(i * total / n, (i + 1) * total / n))) for i in range(n)]
        target = cfg.fps or fps or 1.0  # (DataConfig.validate requires video.fps for sampling "fps")
        step = max(1.0, (fps or target) / target)
        span = step * (n - 1)
        start = rng.uniform(0, max(0.0, total - 1 - span))
        return [min(total - 1, int(start + i * step)) for i in range(n)]

    return pick


def video_to_tensor(frames: torch.Tensor, cfg: VideoConfig, mean, std, train: bool, rng: random.Random) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised [T, 3, S, S]: shorter side to S, random (train) or centre crop."""
    s = cfg.size
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top = rng.randint(0, nh - s) if train else (nh - s) // 2
    left = rng.randint(0, nw - s) if train else (nw - s) // 2
    return normalize(x[..., top : top + s, left : left + s].clamp(0, 1), mean, std)


def audio_features(wav: torch.Tensor, rate: int, cfg: AudioConfig, train: bool, rng: random.Random) -> torch.Tensor:
    """Mono waveform [1, T] -> fixed-length crop/pad -> fbank or log-mel [frames, n_mels], normalised."""
    import torchaudio

    length = int(round(cfg.seconds * rate))
    if wav.shape[1] > length:
        offset = rng.randint(0, wav.shape[1] - length) if train else (wav.shape[1] - length) // 2
        wav = wav[:, offset : offset + length]
    elif wav.shape[1] < length:
        wav = F.pad(wav, (0, length - wav.shape[1]))
    if cfg.features == "fbank":
        feats = torchaudio.compliance.kaldi.fbank(
            wav,
            sample_frequency=rate,
            num_mel_bins=cfg.n_mels,
            frame_shift=10.0,
            frame_length=25.0,
            htk_compat=True,
            window_type="hanning",
            dither=0.0,
            use_energy=False,
        )
    else:
        mel = torchaudio.transforms.MelSpectrogram(
            rate, n_fft=int(0.025 * rate), hop_length=int(0.01 * rate), n_mels=cfg.n_mels
        )(wav)[0]
        feats = torch.log(mel + 1e-6).T
    frames = cfg.num_frames or int(round(cfg.seconds * 100))
    if feats.shape[0] < frames:
        feats = F.pad(feats, (0, 0, 0, frames - feats.shape[0]))
    return (feats[:frames] - cfg.normalize_mean) / (2 * cfg.normalize_std)


class SampleDecoder:
    """Turns one raw webdataset sample (``{"__key__", "txt", "jpg", ...}``) into model inputs per modality."""

    def __init__(
        self,
        cfg: DataConfig,
        modalities: tuple[str, ...],
        train: bool,
        label_key: str | None = None,
        negatives: NegativeSampler | None = None,
    ):
        self.cfg, self.modalities, self.train = cfg, modalities, train
        self.label_key = label_key  # a field of the sample's json passed on as its label (None where absent)
        self.negatives = negatives  # draws each caption's hard negatives (tokenized as ``text_negatives``)
        self.counterfactuals = cfg.counterfactuals and train  # decode each sample's counterfactual pair
        self._tokenizer: Any = None
        if "text" in modalities and not cfg.text.tokenizer:
            raise ValueError("data.text.tokenizer: a local tokenizer directory is needed to load text")

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily, in the worker process
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_local_dir(self.cfg.text.tokenizer or ""))
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": raw["__key__"]}
        if self.label_key is not None:
            out["label"] = sample_label(raw.get("json"), self.label_key)
        for modality in self.modalities:
            if modality == "text":
                data = raw.get("txt")
                text = data.decode("utf-8", errors="replace").strip() if data else ""
                if not text:
                    raise BadSample("missing text")
                ids = self.tokenizer(text, truncation=True, max_length=self.cfg.text.max_length)["input_ids"]
                out["text"] = torch.tensor(ids, dtype=torch.long)
                continue
            ext = member_of(raw, modality)
            if ext is None:
                continue  # absent modality: normal, masked downstream
            # where this medium's random crop starts: its counterfactual repeats it
            draws = rng.getstate() if self.counterfactuals else None
            try:
                out[modality] = self.decode_medium(modality, raw[ext], rng)
            except Exception as e:
                raise BadSample(f"undecodable {modality}") from e
            if self.counterfactuals:
                self._decode_counterfactual(raw, modality, draws, out)
        if not set(out) - {"__key__", "label", "text", COUNTERFACTUAL}:
            raise BadSample("none of the trained media", bad=False)
        if self.negatives is not None and "text" in out:  # drawn last: the media's random crops stay the same
            edits = self.negatives(text, rng)
            ids = (
                self.tokenizer(edits, truncation=True, max_length=self.cfg.text.max_length)["input_ids"]
                if edits
                else []
            )
            out["text_negatives"] = [torch.tensor(i, dtype=torch.long) for i in ids]
        return out

    def _decode_counterfactual(self, raw: dict[str, Any], modality: str, draws: Any, out: dict[str, Any]) -> None:
        """The counterfactual of ``modality`` (when the sample has one) into ``out[COUNTERFACTUAL]``, with the random
        crop of the sample's own medium (``draws``: the state its decode started from), and the pair's caption."""
        ext = member_of(raw, modality, f"{COUNTERFACTUAL}.")
        if ext is None:
            return
        data = raw.get(f"{COUNTERFACTUAL}.txt")
        text = data.decode("utf-8", errors="replace").strip() if data else ""
        if not text:
            raise BadSample(f"counterfactual {modality} without its caption")
        same = random.Random()
        same.setstate(draws)
        pair = out.setdefault(COUNTERFACTUAL, {})
        try:
            pair[modality] = self.decode_medium(modality, raw[ext], same)
        except Exception as e:
            raise BadSample(f"undecodable counterfactual {modality}") from e
        if "text" in self.modalities and "text" not in pair:
            ids = self.tokenizer(text, truncation=True, max_length=self.cfg.text.max_length)["input_ids"]
            pair["text"] = torch.tensor(ids, dtype=torch.long)

    def decode_medium(self, modality: str, data: bytes, rng: random.Random) -> torch.Tensor:
        """One media member's bytes -> the tower's input tensor, as training (``train``) or evaluation sees it."""
        cfg = self.cfg
        if modality == "image":
            img = decode_image(data, min_size=cfg.image.size)
            return image_to_tensor(img, cfg.image, self.train, rng)
        if modality == "video":
            frames = decode_video(
                data, cfg.video.num_frames, cfg.video.backend, frame_sampler(cfg.video, self.train, rng)
            )
            return video_to_tensor(frames, cfg.video, cfg.image.mean, cfg.image.std, self.train, rng)
        wav, rate = decode_audio(data, cfg.audio.sample_rate)
        if wav.numel() == 0:
            raise ValueError("empty audio")
        return audio_features(wav, rate, cfg.audio, self.train, rng)

    def placeholder(self, modality: str) -> torch.Tensor:
        """Zeros of a modality's fixed shape, for samples that lack it (masked out downstream)."""
        return torch.zeros(medium_shape(self.cfg, modality))


def medium_shape(cfg: DataConfig, modality: str) -> tuple[int, ...]:
    """The shape of one sample's decoded medium as the towers get it: image [3, S, S], video [T, 3, S, S], audio
    [frames, n_mels] (100 feature frames per second)."""
    if modality == "image":
        return (3, cfg.image.size, cfg.image.size)
    if modality == "video":
        return (cfg.video.num_frames, 3, cfg.video.size, cfg.video.size)
    return (cfg.audio.num_frames or int(round(cfg.audio.seconds * 100)), cfg.audio.n_mels)


def sample_label(meta: bytes | None, key: str) -> Any:
    """``key`` of a sample's json member, or None (no json, not an object, not valid json, no such key)."""
    try:
        value = json.loads(meta) if meta else None
    except ValueError:
        return None
    return value.get(key) if isinstance(value, dict) else None


def collate_negatives(samples: list[dict[str, Any]], k: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Each sample's caption negatives as ``input_ids`` / ``attention_mask`` [B, k, L] and ``present`` [B, k]
    (a caption that allows fewer than k has the rest absent)."""
    rows = [s.get("text_negatives", []) for s in samples]
    longest = max((len(t) for r in rows for t in r), default=1)
    ids = torch.full((len(samples), k, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), k, longest), dtype=torch.long)
    present = torch.zeros((len(samples), k), dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, t in enumerate(r[:k]):
            ids[i, j, : len(t)], mask[i, j, : len(t)], present[i, j] = t, 1, True
    return {"input_ids": ids, "attention_mask": mask, "present": present}


INPUT_NAMES = {"image": "pixel_values", "video": "pixel_values", "audio": "features"}


def collate(samples: list[dict[str, Any]], decoder: SampleDecoder, pad_id: int = 0) -> dict[str, Any]:
    """Decoded samples -> batch with a presence mask per modality; a modality no sample has is left out. With
    counterfactuals, ``batch[COUNTERFACTUAL]`` holds the samples' pairs in the same form, row for row (absent rows
    where a sample has none; :func:`accord.data.rows.join_counterfactuals` makes them rows of the batch)."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples], **collate_media(samples, decoder, pad_id)}
    if all("__shard__" in s for s in samples):  # the shard each sample came from (Shard.name): keys repeat across
        batch["__shard__"] = [s["__shard__"] for s in samples]  # builds, (shard, key) does not
    if decoder.label_key is not None:
        batch["labels"] = [s.get("label") for s in samples]
    if decoder.negatives is not None and "text" in batch:
        batch["text_negatives"] = collate_negatives(samples, decoder.negatives.per_caption, pad_id)
    if decoder.counterfactuals:
        batch[COUNTERFACTUAL] = collate_media([s.get(COUNTERFACTUAL, {}) for s in samples], decoder, pad_id)
    return batch


def collate_media(samples: list[dict[str, Any]], decoder: SampleDecoder, pad_id: int = 0) -> dict[str, Any]:
    """``{"present": {modality: bool [B]}, modality: {input name: [B, ...]}}`` of the modalities some sample has:
    captions padded with ``pad_id`` (and their attention mask), media stacked with zeros where absent."""
    batch: dict[str, Any] = {"present": {}}
    for modality in decoder.modalities:
        present = torch.tensor([modality in s for s in samples], dtype=torch.bool)
        batch["present"][modality] = present
        if not present.any():
            continue
        if modality == "text":
            batch["text"] = pad_captions([s.get("text") for s in samples], pad_id)
        else:
            stacked = torch.stack([s[modality] if modality in s else decoder.placeholder(modality) for s in samples])
            batch[modality] = {INPUT_NAMES[modality]: stacked}
    return batch


def pad_captions(captions: list[torch.Tensor | None], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Token ids of captions (None: absent) -> ``input_ids`` padded with ``pad_id`` and ``attention_mask`` [B, L]."""
    longest = max((len(c) for c in captions if c is not None), default=1)
    ids = torch.full((len(captions), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(captions), longest), dtype=torch.long)
    for i, c in enumerate(captions):
        if c is not None:
            ids[i, : len(c)] = c
            mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}
