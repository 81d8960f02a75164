"""Validate and convert one medium (image, video, audio) from raw bytes to the bytes stored in a shard.

Each ``process_*`` function is pure: the same input bytes and options give the same output bytes. Any input that
cannot be used raises :class:`MediaError` with a short reason; the builder records it and moves on.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, get_args

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from accord.modalities import AUDIO_FORMAT, VIDEO_CONTAINERS, ImageFormat

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # larger inputs are rejected as decompression bombs

ResizeMode = Literal["no", "keep_ratio", "center_crop", "border"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


class MediaError(ValueError):
    """An input medium that cannot be used; the message is the reason recorded in failures.jsonl."""


@dataclass(frozen=True)
class ImageOptions:
    """How images are converted (img2dataset's resize modes)."""

    resize_mode: ResizeMode = "keep_ratio"
    """no: as is; keep_ratio: shorter side to ``size``; center_crop: then crop square; border: pad to square."""
    size: int = 256
    """Target size of the resize mode, in pixels."""
    max_side: int | None = None
    """Cap the longer side after resizing."""
    resize_only_if_bigger: bool = False
    """Never upscale."""
    min_size: int = 0
    """Reject images whose shorter side is smaller."""
    format: ImageFormat = "jpg"
    """Stored format."""
    quality: int = 95
    """JPEG / WebP quality."""


@dataclass(frozen=True)
class VideoOptions:
    """How clips are stored: as they are, or transcoded to H.264 MP4 by ffmpeg."""

    mode: Literal["keep", "transcode"] = "keep"
    """keep: the input's bytes in its own container; transcode: H.264 MP4."""
    max_side: int | None = None
    """Transcode: cap the longer side."""
    fps: float | None = None
    """Transcode: frame rate."""
    max_seconds: float | None = None
    """Transcode: keep the first seconds only."""
    crf: int = 23
    """Transcode: x264 quality (lower is better)."""
    keep_audio: bool = False
    """Transcode: keep the sound track (AAC)."""
    timeout_s: float = 600.0
    """Transcode: seconds ffmpeg may take for one clip before the clip is rejected (a hung or pathological input)."""


@dataclass(frozen=True)
class AudioOptions:
    """How sounds are stored: 16-bit FLAC."""

    sample_rate: int | None = None
    """Resample to this rate; default: keep the input's."""
    mono: bool = True
    """Downmix to one channel."""
    max_seconds: float | None = None
    """Keep the first seconds only."""


Processed = tuple[bytes, str, dict[str, Any]]  # stored bytes, member extension, metadata


# ---------------------------------------------------------------------------------------------------- images
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, 16/32-bit scaled, CMYK/palette/grey converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        peak = 255.0 if arr.max(initial=0) <= 255 else (65535.0 if arr.max() <= 65535 else float(arr.max()))
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _target_scale(w: int, h: int, opts: ImageOptions) -> float:
    """Scale factor applied to the (orientation-independent) input size, before cropping or padding."""
    if opts.resize_mode == "no":
        scale = 1.0
    elif opts.resize_mode in ("keep_ratio", "center_crop"):
        scale = opts.size / min(w, h)
    else:  # border
        scale = opts.size / max(w, h)
    if opts.max_side is not None:
        scale = min(scale, opts.max_side / (max(w, h) * 1.0))
    if opts.resize_only_if_bigger:
        scale = min(scale, 1.0)
    return scale


def is_svg(data: bytes) -> bool:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") and b"<svg" in head


def _no_fetch(url: str, resource_type: str) -> Any:
    """cairosvg's URL fetcher: inline ``data:`` URLs only; nothing is read from disk or the network."""
    if not url.startswith("data:"):
        raise MediaError(f"SVG references an external resource ({url[:80]}); only inline data: URLs are read")
    from cairosvg.url import fetch

    return fetch(url, resource_type)


def rasterise_svg(data: bytes, opts: ImageOptions) -> tuple[bytes, int, int]:
    """SVG -> PNG rendered directly at the size the resize options ask for (vector art is drawn at the target
    resolution, not drawn small and upscaled); returns the PNG and the SVG's own size in px (96 dpi)."""
    from cairosvg.helpers import node_format
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    try:
        tree = Tree(bytestring=data, unsafe=False, url_fetcher=_no_fetch)
        probe = SimpleNamespace(dpi=96, font_size=16.0, context_width=None, context_height=None)
        w, h, _ = node_format(probe, tree)
    except Exception as e:
        raise MediaError(f"undecodable SVG: {type(e).__name__}: {e}") from None
    if tree.tag != "svg":
        raise MediaError(f"undecodable SVG: the root element is <{tree.tag}>, not <svg>")
    if not (w > 0 and h > 0):
        raise MediaError("SVG without a size: needs width and height in absolute units, or a viewBox")
    scale = _target_scale(w, h, opts)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    if out_w * out_h > Image.MAX_IMAGE_PIXELS:
        raise MediaError(f"SVG too large to rasterise: {out_w}x{out_h} px")
    try:
        png = io.BytesIO()
        PNGSurface(tree, png, 96, output_width=out_w, output_height=out_h).finish()
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"SVG could not be rendered: {type(e).__name__}: {e}") from None
    return png.getvalue(), round(w), round(h)


def process_image(data: bytes, opts: ImageOptions) -> Processed:
    """Decode, orient, convert to RGB, resize / crop / pad and encode one image (SVG: rasterised first)."""
    if is_svg(data):
        png, w, h = rasterise_svg(data, opts)
        out, ext, meta = process_image(png, opts)
        return out, ext, {**meta, "original_width": w, "original_height": h, "source_format": "svg"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w0, h0 = img.size
            scale = _target_scale(w0, h0, opts)
            if scale < 1.0 and img.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale directly when the target is that small (never below target).
                img.draft("RGB", (math.ceil(w0 * scale), math.ceil(h0 * scale)))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except MediaError:
        raise
    except Exception as e:  # PIL raises many types for bad input
        raise MediaError(f"undecodable image: {type(e).__name__}: {e}") from None
    # Original (oriented) size: the draft scale is uniform, so recover it from the exif-transposed ratio.
    rotated = img.size[0] != img.size[1] and (img.size[0] > img.size[1]) != (w0 > h0)
    orig_w, orig_h = (h0, w0) if rotated else (w0, h0)
    if min(orig_w, orig_h) < opts.min_size:
        raise MediaError(f"image too small: {orig_w}x{orig_h} < --min-image-size {opts.min_size}")
    new_w, new_h = max(1, round(orig_w * scale)), max(1, round(orig_h * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (
        opts.resize_mode == "center_crop"
        and (new_w, new_h) != (opts.size, opts.size)
        and scale * min(orig_w, orig_h) >= opts.size - 0.5
    ):
        left, top = (new_w - opts.size) // 2, (new_h - opts.size) // 2
        img = img.crop((left, top, left + opts.size, top + opts.size))
    elif opts.resize_mode == "border" and scale * max(orig_w, orig_h) >= opts.size - 0.5:
        canvas = Image.new("RGB", (opts.size, opts.size), (0, 0, 0))
        canvas.paste(img, ((opts.size - img.size[0]) // 2, (opts.size - img.size[1]) // 2))
        img = canvas
    encoded = io.BytesIO()
    if opts.format == "jpg":
        img.save(encoded, format="JPEG", quality=opts.quality, optimize=False)
    elif opts.format == "png":
        img.save(encoded, format="PNG", compress_level=6)
    else:
        img.save(encoded, format="WEBP", quality=opts.quality, method=4)
    meta = {"width": img.size[0], "height": img.size[1], "original_width": orig_w, "original_height": orig_h}
    return encoded.getvalue(), opts.format, meta


# ---------------------------------------------------------------------------------------------------- video
def _probe_video(data: bytes) -> dict[str, Any]:
    """Open with PyAV, decode the first frame, and read size, fps, duration and whether audio is present."""
    import av

    if not data:
        raise MediaError("undecodable video: empty file")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("undecodable video: no video stream")
            stream = container.streams.video[0]
            frame = next(container.decode(stream), None)
            if frame is None:
                raise MediaError("undecodable video: no decodable frame")
            fps = float(stream.average_rate) if stream.average_rate else None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = None
            return {
                "width": frame.width,
                "height": frame.height,
                "fps": fps,
                "duration": duration,
                "frames": stream.frames or None,
                "codec": stream.codec_context.name,
                "has_audio": bool(container.streams.audio),
            }
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"undecodable video: {type(e).__name__}: {e}") from None


def ffmpeg_binary() -> str:
    """System ffmpeg, else the static binary of imageio-ffmpeg if installed."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        raise RuntimeError("video transcoding needs ffmpeg: apt-get install -y ffmpeg") from None


def _even_scale_filter(max_side: int) -> str:
    # Long side capped at max_side, aspect kept, both sides even (yuv420p needs it).
    return (
        f"scale='if(gte(iw,ih),min({max_side},iw),-2)':'if(gte(iw,ih),-2,min({max_side},ih))',"
        "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    )


def process_video(data: bytes, ext: str, opts: VideoOptions) -> Processed:
    info = _probe_video(data)
    if opts.mode == "keep":
        container = VIDEO_CONTAINERS.get(ext.lower())
        if container is None:
            raise MediaError(f"unsupported video container {ext!r}")
        return data, container, info
    filters = []
    if opts.fps:
        filters.append(f"fps={opts.fps}")
    filters.append(_even_scale_filter(opts.max_side) if opts.max_side else "scale=trunc(iw/2)*2:trunc(ih/2)*2")
    with tempfile.TemporaryDirectory(prefix="accord-video-") as tmp:
        src, dst = os.path.join(tmp, f"in.{ext or 'bin'}"), os.path.join(tmp, "out.mp4")
        with open(src, "wb") as f:
            f.write(data)
        cmd = [ffmpeg_binary(), "-nostdin", "-v", "error", "-i", src]
        if opts.max_seconds:
            cmd += ["-t", str(opts.max_seconds)]
        cmd += ["-vf", ",".join(filters), "-c:v", "libx264", "-preset", "veryfast", "-crf", str(opts.crf)]
        cmd += ["-pix_fmt", "yuv420p", "-threads", "1", "-map_metadata", "-1", "-fflags", "+bitexact"]
        cmd += ["-flags:v", "+bitexact", "-movflags", "+faststart"]
        cmd += ["-c:a", "aac", "-flags:a", "+bitexact"] if opts.keep_audio and info["has_audio"] else ["-an"]
        try:
            proc = subprocess.run(cmd + [dst], capture_output=True, text=True, timeout=opts.timeout_s)
        except subprocess.TimeoutExpired:
            raise MediaError(f"video transcode timed out after {opts.timeout_s:g} s (--video-timeout)") from None
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise MediaError(f"video transcode failed: {msg}")
        with open(dst, "rb") as f:
            out = f.read()
    meta = _probe_video(out)
    meta.update(original_width=info["width"], original_height=info["height"], original_fps=info["fps"])
    meta["original_duration"] = info["duration"]
    return out, "mp4", meta


# ---------------------------------------------------------------------------------------------------- audio
def decode_audio_track(data: bytes) -> tuple[np.ndarray, int]:
    """The first audio stream of any container (a video's sound track too) as float32 [frames, channels]."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        to_planar_float = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_planar_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_planar_float.resample(None)]
    if not chunks:
        raise MediaError("no decodable audio frames")
    return np.ascontiguousarray(np.concatenate(chunks, axis=1).T, dtype=np.float32), int(rate)


def decode_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Waveform float32 [frames, channels] and sample rate; soundfile first, PyAV for other codecs."""
    if not data:
        raise MediaError("undecodable audio: empty file")
    try:
        wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return wav, int(rate)
    except Exception as sf_error:
        try:
            return decode_audio_track(data)
        except Exception:
            # soundfile's message embeds the BytesIO repr (an address): keep only the stable part
            reason = str(sf_error).rsplit(": ", 1)[-1].strip().rstrip(".")
            raise MediaError(f"undecodable audio: {reason}") from None


def process_waveform(wav: np.ndarray, rate: int, opts: AudioOptions) -> Processed:
    original = {"original_sample_rate": rate, "original_channels": int(wav.shape[1])}
    if wav.shape[0] == 0:
        raise MediaError("empty audio: no samples")
    if opts.max_seconds:
        wav = wav[: int(round(opts.max_seconds * rate))]
    if opts.mono and wav.shape[1] > 1:
        wav = wav.mean(axis=1, keepdims=True)
    if opts.sample_rate and opts.sample_rate != rate:
        import torch
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav.T)), rate, opts.sample_rate).T.numpy()
        rate = opts.sample_rate
    out = io.BytesIO()
    sf.write(out, np.clip(wav, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    meta = {"sample_rate": rate, "channels": int(wav.shape[1]), "duration": wav.shape[0] / rate, **original}
    return out.getvalue(), AUDIO_FORMAT, meta


def process_audio(data: bytes, opts: AudioOptions) -> Processed:
    wav, rate = decode_audio_bytes(data)
    return process_waveform(wav, rate, opts)
