"""The import rules of CONTRIBUTING.md hold for src/accord, and each rule fails on a violation planted in a copy."""

from __future__ import annotations

import ast
import importlib.util
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
    "upward": (  # (config importing cli would also close a cycle: every room imports config)
        "resources.py",
        "from accord.worlds.shapes import COLORS\n",
        "accord.resources imports accord.worlds.shapes, a higher layer",
    ),
    "sideways": ("demo/run.py", "from accord.experiments import main as _m\n", "rooms of one layer are independent"),
    "cycle": ("train/optim.py", "import accord.train.main\n", "import cycle: accord.train.main -> accord.train.optim"),
    "cycle through a package": (  # models would import the loader's module, which imports the accord package
        "models/model.py",
        "from accord.data.batches import lockstep as _lockstep\n",
        "import cycle: accord -> accord.consistency.backbone -> accord.data.batches",
    ),
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


def test_scripts_outside_src_import_names_that_exist() -> None:
    """bench/ and data_tools/ run by hand, not in CI: every accord name they import must still exist (and be public)
    after a change of rooms."""
    missing = []
    for script in sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "data_tools").glob("*.py")]):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("accord"):
                module = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None:
                        missing.append(f"{script.name}: {node.module}.{a.name} does not exist")
                    elif a.name.startswith("_"):
                        missing.append(f"{script.name}: {node.module}.{a.name} is private")
    assert not missing, missing
