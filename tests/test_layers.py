"""The import rules of CONTRIBUTING.md hold for src/accord, and each rule fails on a violation planted in a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers.layers import check, read_layers
from helpers.procs import ROOT

LAYERS = read_layers(ROOT / "CONTRIBUTING.md")


def test_src_follows_the_import_rules() -> None:
    assert LAYERS[0] == ["accord.config"] and LAYERS[-1] == ["accord.cli", "accord"]
    assert check(ROOT / "src", LAYERS) == []


PLANTS = {  # file (under src/accord) -> (appended code, the line the checker must print, in part)
    "upward": ("config.py", "from accord.cli import main\n", "accord.config imports accord.cli, a higher layer"),
    "sideways": ("demo/run.py", "from accord.experiments import main as _m\n", "rooms of one layer are independent"),
    "cycle": ("train/optim.py", "import accord.train.main\n", "import cycle: accord.train.main -> accord.train.optim"),
    "private": (
        "evaluation/evaluate.py",
        "from accord.consistency.score import _score_chunk\n",
        "imports private _score_chunk of accord.consistency.score",
    ),
    "function-level stdlib": ("pipeline.py", "def f():\n    import json\n", "imports json inside a function"),
    "function-level accord": (
        "pipeline.py",
        "def g():\n    from accord.shards.read import shard_items\n",
        "imports accord.shards.read inside a function",
    ),
    "new room": ("newroom.py", "X = 1\n", "accord.newroom: a room that is in no layer"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_each_rule_fails_on_a_planted_violation(tmp_path: Path, plant: str) -> None:
    shutil.copytree(ROOT / "src" / "accord", tmp_path / "accord", ignore=shutil.ignore_patterns("__pycache__"))
    file, code, expected = PLANTS[plant]
    with open(tmp_path / "accord" / file, "a") as f:
        f.write("\n" + code)
    problems = check(tmp_path, LAYERS)
    assert len(problems) == 1 and expected in problems[0], problems
