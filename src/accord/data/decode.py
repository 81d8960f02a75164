"""Decoders for shard members: the same functions serve training and ``verify_shards --decode``."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image

VideoBackend = Literal["decord", "pyav", "torchcodec"]


def decode_image(data: bytes, min_size: int | None = None) -> torch.Tensor:
    """Decode to uint8 RGB [3, H, W].

    With ``min_size``, a JPEG at least twice that size is decoded at reduced DCT scale (PIL draft mode) keeping
    the shorter side >= min_size; otherwise torchvision's libjpeg-turbo/libpng decoder is used (about twice as
    fast as PIL here), with PIL as the fallback for formats it does not read.
    """
    if min_size:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if img.format == "JPEG" and min(w, h) >= 2 * min_size:
            scale = min_size / min(w, h)
            img.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        rgb = Image.open(io.BytesIO(data)).convert("RGB")
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """Centres of ``num_frames`` equal segments of a ``total``-frame clip."""
    if total <= 0:
        raise ValueError("video has no frames")
    return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]


FrameSampler = Callable[[int, float], list[int]]  # (total frames, native fps) -> frame indices


def decode_video(
    data: bytes, num_frames: int = 8, backend: VideoBackend = "decord", sampler: FrameSampler | None = None
) -> torch.Tensor:
    """Frames as uint8 [T, H, W, 3]; ``sampler`` picks the indices (default: ``num_frames`` uniformly spaced)."""
    sampler = sampler or (lambda total, fps: uniform_indices(total, num_frames))
    if backend == "decord":
        import decord

        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        return torch.from_numpy(vr.get_batch(sampler(len(vr), vr.get_avg_fps())).asnumpy())
    if backend == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        dec = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1)
        meta = dec.metadata
        return dec.get_frames_at(indices=sampler(meta.num_frames or len(dec), meta.average_fps or 0.0)).data
    if backend == "pyav":
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0.0)
            all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return torch.from_numpy(np.stack([all_frames[i] for i in sampler(len(all_frames), fps)]))
    raise ValueError(f"unknown video backend {backend!r} (decord, pyav, torchcodec)")


def decode_audio(data: bytes, sample_rate: int | None = None, mono: bool = True) -> tuple[torch.Tensor, int]:
    """Waveform float32 [channels, time] (channels = 1 when ``mono``) at ``sample_rate`` (default: native)."""
    import torchaudio

    wav, rate = torchaudio.load(io.BytesIO(data))
    if mono and wav.shape[0] > 1:
        wav = wav.mean(dim=0, keepdim=True)
    if sample_rate and sample_rate != rate:
        wav = torchaudio.functional.resample(wav, rate, sample_rate)
        rate = sample_rate
    return wav, rate
