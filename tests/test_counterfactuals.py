"""Counterfactual pairs (``data.counterfactuals``): the captioning world renders them, the shard builder stores them,
the loader decodes them with their sample's own crop, and each pair joins its batch as one more sample.

The loss's exactness with pairs (2 gloo ranks against one process, global and local gather, masks, hard negatives)
is in test_loss.py (``VARIANTS`` with pairs), accumulation in test_train.py; the run below trains with them at two
ranks under ZeRO-3.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from accord.data.batches import empty_batch, pad_batch
from accord.data.rows import join_counterfactuals
from accord.data.transforms import SampleDecoder, collate
from accord.pipeline import build_shards
from accord.shards.read import shard_items
from accord.shards.sources import read_sources
from accord.shards.verify import verify
from accord.worlds import demo, scenes
from accord.worlds.referee import parse

from helpers.procs import ENV, launch, metrics
from helpers.tiny import data_config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cfworld")
    scenes.write_world(root / "raw", train=48, heldout=6, seed=0, progress=False, counterfactuals=True)
    build_shards(root / "raw" / "train", root / "train", samples_per_shard=8, image_size=32)
    return root


def test_each_training_scene_has_a_counterfactual_that_differs_in_one_thing(world: Path, tmp_path: Path) -> None:
    raw = world / "raw"
    plain = tmp_path / "plain"
    scenes.write_world(plain, train=48, heldout=6, seed=0, progress=False)  # the same world, without pairs
    changed = set()
    for png in sorted((raw / "train").glob("s?????.png")):
        scene = scenes.Scene.from_json(json.loads(png.with_suffix(".json").read_text())["scene"])
        assert png.read_bytes() == (plain / "train" / png.name).read_bytes()  # the scenes are untouched
        pair = png.with_name(f"{png.stem}.counterfactual.png")
        text = pair.with_suffix(".txt").read_text().strip()
        other = parse(text).scene()
        assert other is not None and other != scene, text
        assert not other.held_out_parts(), text  # a true pair trained on: never a held-out combination
        if other.relation != scene.relation:
            assert other.objects == scene.objects and other.relation == scenes.INVERSE[scene.relation]
            changed.add("relation")
        else:
            diffs = [(a, b) for a, b in zip(scene.objects, other.objects, strict=True) if a != b]
            assert len(diffs) == 1, text
            ((a, b),) = diffs
            changed |= {f for f in ("colour", "shape", "size") if getattr(a, f) != getattr(b, f)}
        # the same phrasing: the two captions differ in the changed words only
        assert len(text.split()) == len(png.with_suffix(".txt").read_text().split())
        # the same draws: background and noise equal wherever no object is drawn in either picture
        a, b = (np.asarray(scenes.Image.open(p)).astype(int) for p in (png, pair))
        assert (a == b).mean() > 0.6
    assert changed == {"colour", "shape", "size", "relation"}
    assert not list((raw / "heldout").glob("*.counterfactual.*"))  # evaluation scenes have none


def test_counterfactuals_first_makes_that_change_wherever_it_applies(world: Path, tmp_path: Path) -> None:
    """``counterfactuals_first="relation"``: every two-object scene's pair inverts its relation (where the default
    draws one of four changes), the others still change one thing; the scenes themselves are the same."""
    raw, first = world / "raw", tmp_path / "first"
    scenes.write_world(
        first, train=48, heldout=6, seed=0, progress=False, counterfactuals=True, counterfactuals_first="relation"
    )
    default_inversions = inversions = invertible = 0
    for png in sorted((first / "train").glob("s?????.png")):
        assert png.read_bytes() == (raw / "train" / png.name).read_bytes()
        # parsed from the captions (one phrasing for both), so both scenes name their objects in the same order
        scene = parse(png.with_suffix(".txt").read_text().strip()).scene()
        other = parse(png.with_name(f"{png.stem}.counterfactual.txt").read_text().strip()).scene()
        default = parse((raw / "train" / f"{png.stem}.counterfactual.txt").read_text().strip()).scene()
        assert scene is not None and other is not None and default is not None and other != scene
        if scene.relation is None:
            continue
        inverted = scenes.Scene(scene.objects, scenes.INVERSE[scene.relation])
        if not inverted.held_out_parts():  # otherwise no true training pair inverts it: another change is made
            invertible += 1
            inversions += other == inverted
            default_inversions += default == inverted
    assert invertible >= 10 and inversions == invertible > default_inversions
    with pytest.raises(ValueError, match="counterfactuals_first: 'colours'"):
        scenes.write_world(tmp_path / "bad", train=2, heldout=0, counterfactuals=True, counterfactuals_first="colours")


def test_the_demo_world_pairs_change_one_word_of_training_samples(tmp_path: Path) -> None:
    size = demo.WorldSize(images=24, videos=16, sounds=18, pairs=4, val_per_combo=1)
    demo.generate(tmp_path / "plain", size, seed=0, progress=False)
    counts = demo.generate(tmp_path / "pairs", size, seed=0, progress=False, counterfactuals=True)
    assert [counts[f"train/{k} counterfactual"] for k in ("image", "video", "sound")] == [24, 16, 18]
    changed = set()
    for txt in sorted((tmp_path / "pairs" / "train").glob("*.counterfactual.txt")):
        stem = txt.name.split(".")[0]
        words, other = (tmp_path / "pairs" / "train" / f"{stem}.txt").read_text().split(), txt.read_text().split()
        diffs = [(a, b) for a, b in zip(words, other, strict=True) if a != b]
        assert len(diffs) == 1, (words, other)
        changed.add(diffs[0][0] in demo.DIRECTIONS)
        media = [f for f in txt.parent.glob(f"{stem}.*") if f.suffix in (".png", ".mp4", ".wav") and f.stem == stem]
        assert media
        for f in media:  # the sample itself is the same as in a world without pairs
            assert f.read_bytes() == (tmp_path / "plain" / "train" / f.name).read_bytes()
        if stem.startswith("sound"):
            assert tuple(other[1:3]) not in demo.HELD_OUT_SOUNDS
        else:
            assert tuple(other[1:3]) not in demo.HELD_OUT_SHAPES
    assert changed == {True, False}  # videos change direction too
    assert not list((tmp_path / "pairs" / "val").glob("*.counterfactual.*"))


def test_the_builder_stores_pairs_and_accounts_for_every_unusable_one(world: Path, tmp_path: Path) -> None:
    members = tarfile.open(sorted((world / "train").glob("*.tar"))[0]).getnames()
    assert {"000000000.jpg", "000000000.counterfactual.jpg", "000000000.counterfactual.txt"} <= set(members)
    summary = verify(str(world / "train"), decode=True, progress=False)
    assert summary["ok"] and summary["counterfactuals"] == 48 and summary["modalities"] == {"image": 48}
    item = next(iter(shard_items(str(world / "train"), with_json=True)))
    meta = json.loads(item["json"])
    assert meta["counterfactual"]["text"] and meta["counterfactual"]["image"]["sha256"]
    assert "counterfactual" not in item  # readers that do not ask for pairs see the sample alone

    raw = tmp_path / "raw"
    raw.mkdir()
    src = world / "raw" / "train"
    for stem in ("s00000", "s00001", "s00002", "s00003"):
        for f in src.glob(f"{stem}.*"):
            shutil.copy(f, raw)
    (raw / "s00001.counterfactual.txt").unlink()  # a pair without its caption
    (raw / "s00002.counterfactual.png").unlink()  # a caption without its pair's medium
    shutil.copy(src / "s00004.counterfactual.png", raw / "s00009.counterfactual.png")  # the pair of no sample
    shutil.copy(src / "s00004.counterfactual.txt", raw / "s00009.counterfactual.txt")
    (raw / "s00003.counterfactual.png").write_bytes(b"not an image")
    reasons = {s.origin: s.error for s in read_sources(str(raw))}
    assert reasons["s00000"] is None
    assert reasons["s00001"] == "counterfactual without its caption"
    assert reasons["s00002"] == "counterfactual caption without a counterfactual medium"
    assert reasons["s00009.counterfactual"].startswith("counterfactual of no sample (no s00009.* beside it)")
    stats = build_shards(raw, tmp_path / "shards", samples_per_shard=8, image_size=32)
    assert stats["inputs"] == 5 and stats["written"] == 1 and stats["rejected"] == 4
    failures = [json.loads(line) for line in (tmp_path / "shards" / "failures.jsonl").read_text().splitlines()]
    assert any(f["origin"] == "s00003" and f["reason"].startswith("counterfactual ") for f in failures), failures

    # manifests: counterfactual_text and counterfactual_<medium> columns; a pair of a medium the sample lacks
    rows = [
        {"text": "a red circle", "image": "s00000.png", "counterfactual_image": "s00000.counterfactual.png"},
        {"text": "a red circle", "image": "s00000.png", "counterfactual_audio": "x.flac", "counterfactual_text": "y"},
    ]
    rows[0]["counterfactual_text"] = "a blue circle"
    (raw / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = read_sources(str(raw / "m.jsonl"))
    assert got[0].error is None and got[0].counterfactual_text == "a blue circle" and not got[0].extra
    assert got[0].counterfactual["image"].endswith("s00000.counterfactual.png")
    assert got[1].error == "counterfactual audio of a sample without audio"


def test_the_loader_decodes_pairs_with_their_samples_crop_and_joins_them_as_rows(world: Path, tmp_path: Path) -> None:
    cfg = data_config(str(world / "train"), counterfactuals=True, workers=0)
    decoder = SampleDecoder(cfg, ("text", "image"), train=True)
    raw = next(iter(wds.WebDataset(str(sorted((world / "train").glob("*.tar"))[0]), shardshuffle=False)))
    twin = {**raw, "counterfactual.jpg": raw["jpg"]}  # a pair whose picture is the sample's own
    one, two = (decoder(twin, random.Random(seed)) for seed in (1, 2))
    assert torch.equal(one["image"], one["counterfactual"]["image"])  # the same random crop
    assert not torch.equal(one["image"], two["image"])  # which is random
    got = decoder(raw, random.Random(1))
    assert not torch.equal(got["image"], got["counterfactual"]["image"])
    alone = SampleDecoder(data_config(str(world)), ("text", "image"), train=True)(raw, random.Random(1))
    assert torch.equal(got["image"], alone["image"]) and "counterfactual" not in alone  # pairs change nothing else
    assert "counterfactual" not in SampleDecoder(cfg, ("text", "image"), train=False)(raw, random.Random(1))

    lone = {k: v for k, v in raw.items() if not k.startswith("counterfactual.")}
    batch = collate([got, decoder(lone, random.Random(3))], decoder)
    pairs = batch["counterfactual"]
    assert pairs["present"]["image"].tolist() == [True, False] and pairs["present"]["text"].tolist() == [True, False]
    joined = join_counterfactuals(pad_batch(batch, 3))
    assert joined["present"]["image"].tolist() == [True, True, False, True, False, False]
    assert joined["image"]["pixel_values"].shape[0] == 6 and joined["__key__"] == batch["__key__"]
    assert torch.equal(joined["image"]["pixel_values"][3], got["counterfactual"]["image"])
    ids = joined["text"]["input_ids"][3][joined["text"]["attention_mask"][3].bool()]
    assert decoder.tokenizer.decode(ids, skip_special_tokens=True) == raw["counterfactual.txt"].decode().strip()
    empty = join_counterfactuals(empty_batch(("text", "image"), 3, counterfactuals=True))
    assert [len(p) for p in empty["present"].values()] == [6, 6]  # as many rows as a batch with pairs

    bad = {**raw, "counterfactual.jpg": b"not an image"}
    with pytest.raises(Exception, match="undecodable counterfactual image"):
        decoder(bad, random.Random(1))


@pytest.mark.slow
def test_training_with_pairs_at_two_ranks_under_zero3(world: Path, tmp_path: Path) -> None:
    """2 ranks, ZeRO-3, accumulation 2, hard negatives beside the pairs: every sample trained once per epoch (the
    pairs are rows, not samples) with its pair, and the loss falls."""
    out = tmp_path / "run"
    common = (
        "data.batch_size=4",
        "accum_steps=2",
        "deepspeed.zero_stage=3",
        "epochs=3",
        "log.every=1",
        "log.sample_keys=true",
        "loss.hard_negatives={per_caption: 1}",
    )
    proc = subprocess.run(
        launch(world / "train", out, *common, "data.counterfactuals=true"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 3 * 3  # 48 samples / (2 ranks x 4 x 2) = 3 steps per epoch
    assert [r["counterfactual_pairs"] for r in rows] == [16] * 9  # every sample's pair, in its step
    assert sum(r["loss"] for r in rows[-3:]) < 0.9 * sum(r["loss"] for r in rows[:3])
    logs = sorted((out / "samples").glob("rank*.jsonl"))
    keys = [k for log in logs for line in log.read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(keys) == 3 * 48 and len(set(keys)) == 48  # samples, never their pairs, each once per epoch
