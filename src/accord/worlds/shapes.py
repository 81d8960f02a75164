"""Coloured shapes on noisy backgrounds, still (PNG) or moving across the frame (H.264): the drawing every synthetic
world of accord (:mod:`accord.worlds`) is made of, with its one palette."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def shape_image(
    color: str,
    shape: str,
    rng: np.random.Generator,
    size: int = 64,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
) -> Image.Image:
    """A ``size`` px image of one ``color`` ``shape`` (jittered colour) on a noisy grey background, at ``center``
    (default: random, inside the frame) with ``radius`` (default: random, 18-30% of the side)."""
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


def write_video(
    path: Path, color: str, shape: str, direction: str, rng: np.random.Generator, frames: int = 12, size: int = 64
) -> None:
    """An H.264 clip of ``frames`` frames (8 fps) in which the shape crosses the frame towards ``direction``."""
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
            img = shape_image(color, shape, np.random.default_rng(seed), size, center=pos, radius=r)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
