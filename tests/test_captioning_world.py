"""The captioning world and its referee: the parser inverts the caption grammar exactly, and the referee's figures
equal hand counts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accord.worlds import scenes as world
from accord.worlds.referee import judge, parse, referee
from accord.worlds.scenes import Obj, Scene, caption

OBJECTS = [Obj(s, c, sh) for s in world.SIZES for c in world.COLOURS for sh in world.SHAPES]


def scenes() -> list[Scene]:
    rng = np.random.default_rng(0)
    out = [Scene((o,)) for o in OBJECTS]
    out += [Scene((a, b), rel) for a, b in itertools.product(OBJECTS, OBJECTS) for rel in world.RELATIONS]
    out += [Scene(tuple(OBJECTS[i] for i in rng.choice(len(OBJECTS), 3))) for _ in range(300)]
    return out


def test_parser_inverts_every_template_exactly() -> None:
    checked = 0
    for scene in scenes():
        for template in world.TEMPLATES[len(scene.objects)]:
            text = caption(scene, template)
            assert 6 <= len(text.replace(",", " ").replace(":", " ").split()) <= 14, text
            assert parse(text).scene() == scene, text
            # as a tokenizer's decode may space punctuation
            assert parse(text.replace(",", " ,").replace(":", " :")).scene() == scene, text
            checked += 1
    assert checked > 3000


def test_referee_counts_by_hand() -> None:
    truth = Scene((Obj("small", "red", "circle"), Obj("large", "blue", "square")), "left of")
    assert judge("a small red circle to the left of a large blue square", truth) == {
        "attribute_precision": 1.0,
        "attribute_recall": 1.0,
        "attribute_f1": 1.0,
        "hallucinated_objects": 0.0,
        "missed_objects": 0.0,
        "parsed": 1.0,
        "relation_correct": 1.0,
        "correct": 1.0,
    }
    # the same facts said the other way round hold; a wrong size, a hallucinated green triangle, a wrong relation
    assert judge("a large blue square with a small red circle to its left", truth)["relation_correct"] == 1.0
    wrong = judge("a large red circle above a small green triangle", truth)
    # one-to-one: "large red circle" -> the small red circle (2 agree), "small green triangle" -> the large blue
    # square (0 agree); the other assignment also gives 1 + 1. 2 of 6 stated, 2 of 6 true.
    assert wrong["attribute_precision"] == pytest.approx(2 / 6)
    assert wrong["attribute_recall"] == pytest.approx(2 / 6)
    assert wrong["hallucinated_objects"] == 1.0 and wrong["relation_correct"] == 0.0
    assert wrong["attribute_f1"] == pytest.approx(2 / 6) and wrong["correct"] == pytest.approx((2 / 6 + 0) / 2)
    vague = judge("a red circle", truth)  # no size: parsed as a mention, not as a grammatical scene
    assert vague["parsed"] == 0.0 and vague["attribute_precision"] == 1.0 and vague["missed_objects"] == 1.0
    # F1 of precision 1 and recall 2/6 is 0.5; no relation stated of a two-object scene counts 0 for it
    assert vague["attribute_f1"] == pytest.approx(0.5) and vague["correct"] == pytest.approx(0.25)
    both = referee(["a small red circle to the left of a large blue square", "a red circle"], [truth, truth])
    assert both["relation_accuracy"] == 1.0 and both["relations_stated"] == 1.0
    assert both["attribute_recall"] == pytest.approx((1 + 2 / 6) / 2)


def test_world_files_and_held_out_split(tmp_path: Path) -> None:
    world.write_world(tmp_path, train=40, heldout=12, seed=3, progress=False)
    for split, held in (("train", False), ("heldout", True)):
        stems = sorted((tmp_path / split).glob("*.png"))
        assert len(stems) == (40 if split == "train" else 12)
        for png in stems:
            meta = json.loads(png.with_suffix(".json").read_text())
            scene = Scene.from_json(meta["scene"])
            assert bool(meta["held_out"]) == held
            assert parse(png.with_suffix(".txt").read_text()).scene() == scene
            assert Image.open(png).size == (64, 64)


@pytest.mark.parametrize("what", world.CHANGES)
def test_one_change_changes_exactly_one_thing(what: str) -> None:
    rng = np.random.default_rng(0)
    for scene in scenes()[::37]:
        other = world.one_change(scene, what, rng)
        if what == "relation":
            assert (other is None) == (scene.relation is None)
            if other is not None:
                assert other.objects == scene.objects and other.relation == world.INVERSE[scene.relation]
            continue
        diffs = [(a, b) for a, b in zip(scene.objects, other.objects, strict=True) if a != b]
        assert len(diffs) == 1 and other.relation == scene.relation
        ((a, b),) = diffs
        attr = {"colour": "colour", "shape": "shape", "size": "size"}[what]
        assert getattr(a, attr) != getattr(b, attr)
        assert all(getattr(a, f) == getattr(b, f) for f in ("colour", "shape", "size") if f != attr)
