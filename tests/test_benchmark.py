"""CLIP_benchmark interop: its webdataset layout and ImageFolders read by ``accord eval``, its result rows written,
and accord's figures equal to CLIP_benchmark's own metric functions (from PyPI) on the same embeddings."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from accord.consistency.backbone import load_backbone
from accord.evaluation.benchmark import evaluate_set, read_image_folder, read_wds_benchmark
from accord.evaluation.evaluate import main as eval_main

from helpers.backbones import random_backbone
from helpers.media import solid

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
builder = pytest.importorskip("clip_benchmark.datasets.builder")
pytest.importorskip("sklearn")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (245, 245, 245), "black": (10, 10, 10)}  # fmt: skip
FORMATS = ("webp", "png", "jpg")


def image_bytes(colour: str, seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    solid(COLOURS[colour], 40, 30, seed=seed).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def write_wds(root: Path, retrieval: bool = False) -> Path:
    """A CLIP_benchmark webdataset folder (the layout of clip_benchmark_export_wds): 2 shards of the test split."""
    (root / "test").mkdir(parents=True)
    samples = [(c, i) for i in range(4) for c in COLOURS]
    for shard in range(2):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as tar:
            for n, (colour, i) in enumerate(samples[shard::2]):
                fmt = FORMATS[n % 3]
                sample = {"__key__": f"s{shard}{n:04d}", fmt: image_bytes(colour, 7 * i + shard, fmt)}
                if retrieval:
                    sample["txt"] = f"a {colour} picture\na picture that is {colour}" if i % 2 else f"{colour}"
                else:
                    sample["cls"] = str(list(COLOURS).index(colour))
                tar.write(sample)
    (root / "test" / "nshards.txt").write_text("2")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} picture.\n")
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_backbone("tiny.yaml", tmp_path_factory.mktemp("bench") / "backbone", seed=3)


def test_classification_equals_clip_benchmarks_metrics(backbone: Path, tmp_path: Path) -> None:
    root = write_wds(tmp_path / "wds_colours")
    # CLIP_benchmark reads the folder accord was given: same samples, classes and templates
    theirs = builder.build_wds_dataset("colours", transform=None, split="test", data_dir=str(root))
    assert theirs.classes == list(COLOURS) and theirs.templates == ["a photo of a {c}.", "a {c} picture."]
    assert len(list(theirs)) == 24
    data = read_wds_benchmark(str(root))
    assert (len(data.images), data.read, data.skipped) == (24, 24, {})
    model = load_backbone(str(backbone))
    ours = evaluate_set(model, data)
    # CLIP_benchmark's own functions on the same embeddings: its classifier, logits, accuracy, balanced accuracy
    with torch.no_grad():
        images = F.normalize(model.embed("image", data.images), dim=-1)
        weights = torch.stack(
            [
                F.normalize(
                    F.normalize(model.embed("text", [t.format(c=c) for t in theirs.templates]), dim=-1).mean(0), dim=0
                )
                for c in theirs.classes
            ],
            dim=1,
        )
    logits, target = 100.0 * images @ weights, torch.tensor(data.labels)
    # zsc.accuracy's own lines: its last one, float() of a 1-element array, raises under NumPy 2 (CLIP_benchmark
    # 1.6.2 predates it), so the sum is taken as .item() here
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    acc1, acc5 = (correct[:k].reshape(-1).float().sum().item() / len(target) for k in (1, 5))
    recall = zsc.balanced_accuracy_score(target, logits.argmax(1))
    assert ours == pytest.approx({"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}, abs=1e-6)
    assert 0 < ours["acc5"] < 1 or 0 < ours["acc1"] < 1  # a random tower: not a degenerate all-or-nothing

    # the command: a CLIP_benchmark result file that its `clip_benchmark build` aggregation reads
    out = tmp_path / "result.json"
    assert eval_main(["--backbone", str(backbone), "--data", str(root), "--results", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["dataset"] == "wds/wds_colours" and row["task"] == "zeroshot_classification"
    assert row["metrics"] == pytest.approx(ours, abs=1e-6) and {"model", "pretrained", "language"} <= set(row)


def test_fewer_than_five_classes_give_acc5_nan_as_clip_benchmark(backbone: Path, tmp_path: Path) -> None:
    root = write_wds(tmp_path / "few")
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")  # indices 3-5 now name no class: counted, not used
    data = read_wds_benchmark(str(root))
    assert len(data.images) == 12 and data.skipped == {"no class index (.cls) within classnames.txt": 12}
    assert math.isnan(evaluate_set(load_backbone(str(backbone)), data)["acc5"])


def test_retrieval_equals_clip_benchmarks_recall(backbone: Path, tmp_path: Path) -> None:
    root = write_wds(tmp_path / "wds_captions", retrieval=True)
    theirs = builder.build_wds_dataset("captions", transform=None, split="test", data_dir=str(root))
    captions = [texts for _, texts in theirs]
    data = read_wds_benchmark(str(root))
    assert sorted(map(tuple, data.captions)) == sorted(map(tuple, captions))
    model = load_backbone(str(backbone))
    ours = evaluate_set(model, data)
    with torch.no_grad():
        images = F.normalize(model.embed("image", data.images), dim=-1)
        texts = F.normalize(model.embed("text", [c for cs in data.captions for c in cs]), dim=-1)
    owner = [i for i, cs in enumerate(data.captions) for _ in cs]
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    expected = {}
    for k in (1, 5, 10):
        expected[f"image_retrieval_recall@{k}"] = (
            (zsr.batchify(zsr.recall_at_k, scores, positive, 8, "cpu", k=k) > 0).float().mean().item()
        )
        expected[f"text_retrieval_recall@{k}"] = (
            (zsr.batchify(zsr.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0).float().mean().item()
        )
    assert ours == pytest.approx(expected, abs=1e-6)
    assert len(owner) > len(data.images)  # several captions per image: recall counts any of them


def test_image_folder_with_class_names_and_unreadable_files(backbone: Path, tmp_path: Path) -> None:
    root = tmp_path / "val"
    for c, colour in enumerate(COLOURS):
        folder = root / f"n{c:08d}"  # ImageNet-style WordNet ids; the names come from --classes
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"img{i}.{FORMATS[i]}").write_bytes(image_bytes(colour, i, FORMATS[i]))
    (root / "n00000000" / "notes.txt").write_text("not an image")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(COLOURS) + "\n")
    data = read_image_folder(str(root), str(names))
    assert data.classes == list(COLOURS) and data.labels == [c for c in range(6) for _ in range(2)]
    assert data.read == 13 and data.skipped == {"not an image (.txt)": 1}
    out = tmp_path / "imagenet.json"
    assert eval_main(["--backbone", str(backbone), "--imagenet-val", str(root), "--classes", str(names),
                      "--results", str(out)]) == 0  # fmt: skip
    row = json.loads(out.read_text())
    assert row["dataset"] == "imagefolder/val"
    assert row["metrics"] == pytest.approx(evaluate_set(load_backbone(str(backbone)), data), abs=1e-6)
