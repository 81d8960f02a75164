"""One media table for every reader: what the builder writes is what the loader, accord score, accord eval and the
demo report read (an avi-only sample was invisible to all but the trainer when each kept its own copy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accord.consistency.score import main as main_score
from accord.demo.run import score_examples
from accord.evaluation.evaluate import main as main_eval
from accord.modalities import AUDIO_FORMAT, IMAGE_FORMATS, INPUT_EXTS, MEMBER_EXTS, VIDEO_CONTAINERS
from accord.shards.build import BuildConfig, build
from accord.shards.read import shard_items

from helpers.backbones import random_backbone
from helpers.media import write_video


def test_every_member_the_builder_writes_is_read_back() -> None:
    written = {"image": set(IMAGE_FORMATS), "video": set(VIDEO_CONTAINERS.values()), "audio": {AUDIO_FORMAT}}
    for medium, exts in written.items():
        assert exts <= set(MEMBER_EXTS[medium]), medium
        assert set(MEMBER_EXTS[medium]) <= INPUT_EXTS[medium], medium  # a shard's member is also a valid input
    assert "avi" in MEMBER_EXTS["video"]


@pytest.fixture(scope="module")
def avi_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two samples whose only medium is an .avi clip, kept as it is (--video-mode keep)."""
    raw = tmp_path_factory.mktemp("avi_raw")
    for i, color in enumerate(("red", "blue")):
        write_video(raw / f"clip{i}.avi", seconds=0.5, size=(32, 24), color=color)
        (raw / f"clip{i}.txt").write_text(f"a {color} video\n")
    out = tmp_path_factory.mktemp("avi_shards")
    build(BuildConfig(input=str(raw), output=str(out), samples_per_shard=1, progress=False))
    return out


def test_an_avi_only_sample_is_seen_by_score_eval_and_the_demo_report(
    avi_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    items = list(shard_items(str(avi_shards)))
    assert [sorted(k for k in i if k in MEMBER_EXTS) for i in items] == [["video"], ["video"]]
    backbone = random_backbone("tiny.yaml", tmp_path / "backbone")

    scores = tmp_path / "scores.jsonl"
    assert main_score(["--backbone", str(backbone), "--input", str(avi_shards), "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 2 and all("text-video" in r and "error" not in r for r in rows), rows

    capsys.readouterr()
    assert main_eval(["--backbone", str(backbone), "--data", str(avi_shards)]) == 0
    assert json.loads(capsys.readouterr().out)["text-video/n"] == 2

    examples = score_examples(backbone, avi_shards)  # the report's examples and histograms
    assert sorted(examples["video"]["captions"]) == ["a blue video", "a red video"]
