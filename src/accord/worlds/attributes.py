"""The attribute world (the fusion-head benchmark, ``accord experiment fusion``): captions that name colour + shape
+ position ("a red circle on the left") or colour + shape + motion ("a blue square moving up"), and
one-attribute-wrong variants of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from accord.worlds.shapes import COLORS, DIRECTIONS, SHAPES, shape_image, write_video

POSITIONS = {"top": (0.5, 0.27), "bottom": (0.5, 0.73), "left": (0.27, 0.5), "right": (0.73, 0.5)}
ATTRIBUTES = ("colour", "shape", "position", "motion")


def generate_attributes(
    out: Path, images: int, videos: int, seed: int = 0, size: int = 32, progress: bool = True
) -> dict[str, int]:
    """``out/a{i}.png`` + "a red circle on the left" and ``out/v{i}.mp4`` + "a blue square moving up"; every
    (colour, shape, position / direction) combination in turn."""

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
            shape_image(color, shape, rng, size, center=center, radius=0.2 * size).save(out / f"a{i:05d}.png")
            (out / f"a{i:05d}.txt").write_text(f"a {color} {shape} on the {where}\n")
        else:
            write_video(out / f"v{i:05d}.mp4", color, shape, where, rng, frames=8, size=size)
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
