"""Real encoded test media, generated on the fly (PIL, ffmpeg, soundfile)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (so resizing and orientation are checkable)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, size=3)
    arr = np.stack(
        [
            (x * 255 // max(w - 1, 1) + base[0]) % 256,
            (y * 255 // max(h - 1, 1) + base[1]) % 256,
            np.full_like(x, base[2]),
        ],
        axis=-1,
    ).astype(np.uint8)
    arr[: h // 4, : w // 4] = (255, 0, 0)  # red block at top-left marks orientation
    return Image.fromarray(arr, "RGB")


def write_image(path: Path, kind: str, seed: int = 0, size: tuple[int, int] = (96, 64)) -> Path:
    img = gradient(*size, seed=seed)
    if kind == "jpg":
        img.save(path, "JPEG", quality=90)
    elif kind == "png":
        img.save(path, "PNG")
    elif kind == "rgba":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 0)
        alpha.paste(255, (0, 0, img.size[0] // 2, img.size[1]))  # right half transparent
        rgba.putalpha(alpha)
        rgba.save(path, "PNG")
    elif kind == "palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, "PNG")
    elif kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray":
        img.convert("L").save(path, "PNG")
    elif kind == "16bit":
        arr = np.asarray(img.convert("L")).astype(np.uint16) * 257
        Image.fromarray(arr).save(path, "PNG")  # uint16 -> mode I;16
    elif kind == "exif_rotated":
        # Stored sideways (rotated 90 deg clockwise in pixels), tagged Orientation=8 (display rotates it back).
        exif = Image.Exif()
        exif[0x0112] = 8
        img.transpose(Image.Transpose.ROTATE_270).save(path, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "webp":
        img.save(path, "WEBP", quality=90)
    else:
        raise ValueError(kind)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    gradient(128, 96).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def write_video(
    path: Path,
    seconds: float = 1.0,
    size: tuple[int, int] = (64, 48),
    fps: int = 10,
    audio: bool = False,
    pattern: str = "testsrc",
    color: str | None = None,
) -> Path:
    """An h264 mp4 of an ffmpeg test pattern (or a plain ``color``), optionally with a 440 Hz AAC track; a path
    ending in .avi gets MPEG-4 part 2 in an AVI container instead."""
    source = f"color=c={color}:" if color else f"{pattern}="
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"{source}size={size[0]}x{size[1]}:rate={fps}:duration={seconds}",
    ]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    if path.suffix == ".avi":
        cmd += ["-c:v", "mpeg4", "-q:v", "5"]
    else:
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
    cmd += ["-c:a", "aac", "-shortest"] if audio else []
    subprocess.run(cmd + [str(path)], check=True)
    return path


def solid(color: tuple[int, int, int], w: int, h: int, seed: int) -> Image.Image:
    """A plain colour with mild noise."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.float64) + rng.normal(0, 12, size=(h, w, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def write_audio(path: Path, seconds: float = 0.5, rate: int = 22050, channels: int = 2, freq: float = 440.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * freq * t)
    wav = np.stack([wav * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)
    fmt = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}[path.suffix[1:]]
    sf.write(path, wav, rate, format=fmt)
    return path


def many_images(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` captioned JPEG gradients: an input slow enough to kill a build in the middle of."""
    folder.mkdir()
    for i in range(n):
        gradient(*size, seed=i).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"picture {i}")
    return folder
