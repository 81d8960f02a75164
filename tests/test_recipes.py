"""The recipe study's ground rules: test captions and zero-shot class names share no content word with training
captions, and its retrieval metric counts a hit by class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord.experiments import recipes
from accord.worlds import paraphrases as r

FUNCTION_WORDS = {"a", "an", "one", "of", "on", "is", "there", "this", "the"}


def words(text: str) -> set[str]:
    return {w.strip(",.") for w in text.replace("-", " ").split()} - FUNCTION_WORDS - {"{}", "{c}", "{s}"}


def test_held_out_wording_never_occurs_in_training_captions() -> None:
    rng = np.random.default_rng(0)
    train = set().union(
        *(words(r.caption(c, s, rng, paraphrase=False)) for c in r.COLOURS for s in r.SHAPES for _ in range(20))
    )
    train |= set().union(*(words(t) for t in r.TRAIN_TEMPLATES))
    held_out = set().union(*(words(t) for t in (*r.TEST_TEMPLATES, *r.ZEROSHOT_TEMPLATES)))
    held_out |= set().union(*(words(w) for ws in (*r.COLOUR_WORDS.values(), *r.SHAPE_WORDS.values()) for w in ws))
    test = set().union(
        *(words(r.caption(c, s, rng, paraphrase=True)) for c in r.COLOURS for s in r.SHAPES for _ in range(20))
    )
    assert test <= held_out and "crimson" in test and "red" in train
    assert not train & held_out, train & held_out


def test_class_level_r1_by_hand() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.7, 0.3]])
    query = torch.tensor([0, 1, 2])
    target = torch.tensor([0, 1, 1])  # query 1's best target (2) has class 1: a hit although it is not target 1
    assert recipes.class_r1(sims, query, target) == pytest.approx(2 / 3)  # query 2's best (1) has class 1, not 2
