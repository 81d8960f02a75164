"""The paraphrase world of the recipe study (``accord experiment recipes``): coloured shapes (6 colours x 3 shapes =
18 classes) whose training captions use one vocabulary ("a red circle") and whose test captions are paraphrases
whose content words never occur in training ("an image showing a crimson disc"); zero-shot class names and
templates are held out too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accord.worlds.shapes import COLORS, SHAPES, shape_image

COLOURS = tuple(COLORS)
TRAIN_TEMPLATES = ("a {c} {s}", "a {c} {s} on a noisy background", "a picture of a {c} {s}", "there is a {c} {s}")
# Held out: no content word of these occurs in a training caption.
COLOUR_WORDS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("amber", "tangerine"),
}
SHAPE_WORDS = {
    "circle": ("disc", "round blob"),
    "square": ("box", "four-sided block"),
    "triangle": ("three-sided shape", "wedge"),
}
TEST_TEMPLATES = ("an image showing a {c} {s}", "{c} {s}, drawn over static", "this photo depicts one {c} {s}")
ZEROSHOT_TEMPLATES = ("a drawing of a {}.", "an illustration of a {}.")


def caption(colour: str, shape: str, rng: np.random.Generator, paraphrase: bool) -> str:
    """A caption of a (colour, shape) in the training vocabulary, or (``paraphrase``) in the held-out one."""
    if not paraphrase:
        return str(rng.choice(TRAIN_TEMPLATES)).format(c=colour, s=shape)
    return str(rng.choice(TEST_TEMPLATES)).format(c=rng.choice(COLOUR_WORDS[colour]), s=rng.choice(SHAPE_WORDS[shape]))


def render(out: Path, per_class: int, seed: int, test: bool) -> None:
    """``per_class`` images of every (colour, shape) with a training or a paraphrased caption and a json label."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(per_class * len(COLOURS) * len(SHAPES)):
        label = i % (len(COLOURS) * len(SHAPES))
        colour, shape = COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
        shape_image(colour, shape, rng, size=32).save(out / f"s{i:05d}.png")
        (out / f"s{i:05d}.txt").write_text(caption(colour, shape, rng, paraphrase=test) + "\n")
        (out / f"s{i:05d}.json").write_text(json.dumps({"label": label, "colour": colour, "shape": shape}))
