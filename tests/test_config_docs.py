"""Every config field is documented where it is declared, `accord train --print-config` prints them all, and the
README's config reference is that output."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re

import pytest

import accord
from accord.config import describe, field_docs, reference
from accord.train.config import TrainConfig
from accord.train.main import main as train_main

from helpers.procs import ROOT


def config_classes() -> list[type]:
    """Every dataclass of accord named ``*Config`` or ``*Options``."""
    found = {}
    for info in pkgutil.walk_packages(accord.__path__, "accord."):
        if info.name in ("accord.cli", "accord.train.__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if dataclasses.is_dataclass(obj) and name.endswith(("Config", "Options")) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return [found[k] for k in sorted(found)]


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    sections = {
        f.name
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(f.type) or "Config" in str(f.type) or "Options" in str(f.type)
    }
    undocumented = [f.name for f in dataclasses.fields(cls) if f.name not in docs and f.name not in sections]
    assert cls.__doc__ and not undocumented, f"{cls.__name__}: {undocumented}"


def test_print_config_lists_every_key_with_type_default_and_doc(capsys: pytest.CaptureFixture) -> None:
    assert train_main(["--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == reference(TrainConfig)
    keys = [d.key for d in describe(TrainConfig)]
    assert {"optim.lr", "model.towers.<modality>.kind", "eval.zeroshot.classes", "data.audio.n_mels"} <= set(keys)
    assert all(d.doc for d in describe(TrainConfig)), [d.key for d in describe(TrainConfig) if not d.doc]
    assert "| `optim.lr` | float | `0.0005` | Peak learning rate" in printed


def test_print_config_with_a_config_shows_its_values(capsys: pytest.CaptureFixture) -> None:
    assert train_main(["--config", "tiny", "--print-config", "data.train=x", "optim.lr=0.25"]) == 0
    printed = capsys.readouterr().out
    assert "| `optim.lr` | float | `0.0005` | Peak learning rate" in printed and printed.count("`0.25` |") == 1
    assert "| `model.towers.audio.kind` |" in printed and "<modality>" not in printed


def test_readme_config_reference_is_the_print_config_output() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- config-reference[^>]*-->\n(.*?)<!-- /config-reference -->", readme, re.S)
    assert block is not None, "README.md has no config-reference block"
    assert block.group(1) == reference(TrainConfig), "regenerate it: make config-reference"
