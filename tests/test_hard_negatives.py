"""Hard negatives in training: drawn per caption by the loader (typed, meaning-checked, another draw each epoch, the
same on a rerun), batched with a presence mask, scored as non-matches by the fusion head's matching loss, and
refused with the dotted key when misconfigured. Their exactness in the contrastive loss at 2 ranks is in
test_loss.py (``VARIANTS`` with a weight), under accumulation in test_train.py, and under ZeRO 2-3 in
test_train.py's training runs."""

from __future__ import annotations

import random

import pytest
import torch

from accord.config import ConfigError
from accord.data.loader import Loader
from accord.data.negatives import CATEGORIES, NegativeSampler, Vocabulary, negatives, read
from accord.losses.contrastive import HardNegativesConfig
from accord.losses.matching import MatchingLoss
from accord.models.config import FusionConfig
from accord.models.fusion import FusionHead
from accord.models.model import ModelOutput

from helpers.tiny import BERT, VIT, data_config

CAPTIONS = ["a red picture", "a blue video", "a low tone", "a high tone", "a green picture with a low tone"]


def test_sampler_draws_distinct_valid_types_and_varies_with_the_generator() -> None:
    vocab = Vocabulary.from_captions(CAPTIONS)
    sampler = NegativeSampler(vocab, tuple(CATEGORIES), per_caption=2)
    caption = "a green picture with a low tone"
    truth = read(caption, vocab).meaning()
    draws = set()
    for seed in range(20):
        edits = sampler(caption, random.Random(seed))
        assert len(edits) == 2 and len(set(edits)) == 2
        assert all(read(e, vocab).meaning() != truth and e != caption for e in edits)
        draws.update(edits)
        assert edits == sampler(caption, random.Random(seed))  # the same generator, the same negatives
    assert len(draws) > 4  # other epochs draw other edits
    only_pitch = NegativeSampler(vocab, ("replace pitch",), per_caption=3)
    assert only_pitch(caption, random.Random(0)) == [caption.replace("low", "high")]  # fewer than asked: what exists
    assert only_pitch("a red picture", random.Random(0)) == []


def test_the_loader_batches_each_captions_negatives_with_a_mask(mixed_shards) -> None:
    shards, _ = mixed_shards
    captions = ["a red picture", "a green video", "a low tone", "a high tone", "a blue picture with a low tone"]
    vocab = Vocabulary.from_captions(captions)
    sampler = NegativeSampler(vocab, tuple(CATEGORIES), per_caption=2)
    cfg = data_config(str(shards), workers=0, shuffle=False)

    def epoch() -> list[dict]:
        loader = Loader(cfg, ("text", "image", "video", "audio"), train=True, rank=0, world=1, negatives=sampler)
        return list(loader)

    batches = epoch()
    tok = Loader(cfg, ("text",), train=True, rank=0, world=1).decoder.tokenizer
    seen = 0
    for b in batches:
        neg = b["text_negatives"]
        n = len(b["__key__"])
        assert neg["input_ids"].shape[:2] == (n, 2) and neg["present"].shape == (n, 2)
        for i in range(n):
            caption = tok.decode(
                b["text"]["input_ids"][i][b["text"]["attention_mask"][i].bool()], skip_special_tokens=True
            )
            allowed = set(negatives(vocab, caption, key="any")) & set(CATEGORIES)
            assert int(neg["present"][i].sum()) == min(2, len(allowed)), caption
            for j in range(2):
                ids, mask = neg["input_ids"][i, j], neg["attention_mask"][i, j].bool()
                if not neg["present"][i, j]:
                    assert not mask.any()
                    continue
                edit = tok.decode(ids[mask], skip_special_tokens=True)
                assert edit != caption and read(edit, vocab).meaning() != read(caption, vocab).meaning()
                seen += 1
    assert seen >= 48  # every caption of the shards allows at least one edit
    again = epoch()  # a rerun (or a resume) draws the same negatives
    for a, b in zip(batches, again, strict=True):
        assert torch.equal(a["text_negatives"]["input_ids"], b["text_negatives"]["input_ids"])


def test_matching_loss_adds_each_constructed_negative_as_a_non_match() -> None:
    torch.manual_seed(0)
    n, k, length, width = 4, 2, 5, 16
    head = FusionHead(FusionConfig(dim=16, layers=1, heads=2), {"text": width, "image": width}).eval()
    text, image = torch.randn(n, length, width), torch.randn(n, 6, width)
    mask, image_mask = torch.ones(n, length, dtype=torch.bool), torch.ones(n, 6, dtype=torch.bool)
    emb = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    negs, neg_mask = torch.randn(n, k, length + 2, width), torch.ones(n, k, length + 2, dtype=torch.bool)
    neg_mask[:, :, length:] = False
    present = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]]).bool()
    out = ModelOutput(
        embeddings={"text": emb, "image": emb.flip(0)},
        present={"text": torch.ones(n, dtype=torch.bool), "image": torch.ones(n, dtype=torch.bool)},
        logit_scale={"text-image": torch.tensor([10.0])},
        logit_bias=None,
        pairs=[("text", "image")],
        tokens={"text": text, "image": image},
        token_mask={"text": mask, "image": image_mask},
        negatives=torch.zeros(n, k, 8),
        negative_present=present,
        negative_tokens=negs,
        negative_token_mask=neg_mask,
    )
    torch.manual_seed(1)
    plain, _ = MatchingLoss(temperature=1.0)(out, head, [("text", "image")])
    torch.manual_seed(1)  # the same mined negatives
    both, parts = MatchingLoss(temperature=1.0, constructed=True)(out, head, [("text", "image")])
    rows = [(i, j) for i in range(n) for j in range(k) if present[i, j]]
    logits = torch.stack(
        [
            head(negs[i, j : j + 1], neg_mask[i, j : j + 1], image[i : i + 1], image_mask[i : i + 1], "image")[0]
            for i, j in rows
        ]
    )
    extra = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.zeros(len(rows)), reduction="sum"
    )
    # plain: the mean over 3 n rows; with constructed negatives: over 3 n + 5 rows
    assert both.item() == pytest.approx((plain.item() * 3 * n + extra.item()) / (3 * n + len(rows)), rel=1e-5)
    assert "match/text-image" in parts


@pytest.mark.parametrize(
    "value,message",
    [
        ({"types": ["replace colour", "replace mood"]}, "loss.hard_negatives.types: unknown category 'replace mood'"),
        ({"types": []}, "loss.hard_negatives.types: empty"),
        ({"per_caption": 0}, "loss.hard_negatives.per_caption: must be >= 1"),
        ({"weight": 0}, "loss.hard_negatives.weight: must be > 0"),
    ],
)
def test_config_errors_name_the_key(value: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        HardNegativesConfig(**value).validate("loss.hard_negatives")


@pytest.mark.parametrize("unfreeze", [0, 1], ids=["frozen", "cut-layer"])
def test_a_frozen_text_tower_caches_negatives_like_any_caption(unfreeze: int) -> None:
    """The negatives run through the text tower beside the captions: cached per distinct text (a cut-layer tower:
    its bottom's token states), and embedded exactly as the same text would be as a caption."""
    from accord.config import from_dict
    from accord.models import AccordModel
    from accord.models.config import ModelConfig

    text = {"kind": "bert", "hf": BERT, "freeze": True, **({"unfreeze_last_n": unfreeze} if unfreeze else {})}
    torch.manual_seed(0)
    model = AccordModel(
        from_dict(ModelConfig, {"embed_dim": 16, "towers": {"text": text, "image": {"kind": "vit", "hf": VIT}}})
    )
    assert model.enable_frozen_caches() == {"text": None}
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (4, 6), generator=g)
    negs = torch.randint(1, 200, (4, 2, 7), generator=g)
    negs[3, 1] = torch.cat([ids[0], torch.zeros(1, dtype=torch.long)])  # one negative is another sample's caption
    neg_mask = torch.ones_like(negs)
    neg_mask[3, 1, 6] = 0
    batch = {
        "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "image": {"pixel_values": torch.randn(4, 3, 16, 16, generator=g)},
        "text_negatives": {
            "input_ids": negs,
            "attention_mask": neg_mask,
            "present": torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]]).bool(),
        },
    }
    with torch.no_grad():
        out = model(batch)
        assert model.frozen_cache_stats()["frozen_cache/text/items"] == 4 + 7 - 1  # distinct live texts
        assert torch.equal(out.negatives[3, 1], out.embeddings["text"][0])  # the same text, the same features
        assert not out.negatives[2, 1].any()  # absent: a zero row
        alone = model(
            {"text": {"input_ids": negs[:, 0], "attention_mask": neg_mask[:, 0]}, "image": batch["image"]}
        ).embeddings["text"]
        assert torch.equal(alone, out.negatives[:, 0])


def test_seen_only_negatives_never_assert_a_combination_outside_training() -> None:
    from accord.data.negatives import seen_facts

    train = ["a red circle", "a blue square", "a red square", "a red circle to the left of a blue square"]
    vocab = Vocabulary.from_captions(train)
    seen = seen_facts(train, vocab)
    assert ("object", (None, "red", "square")) in seen and ("object", (None, "blue", "circle")) not in seen
    free = negatives(vocab, "a red circle", key="k")
    kept = negatives(vocab, "a red circle", key="k", seen=seen)
    assert free["replace colour"] == "a blue circle" and "replace colour" not in kept  # blue circles: never seen
    assert kept["replace shape"] == "a red square"
    # the relation with its arguments swapped asserts "blue square left of red circle": not seen either
    rel = "a red circle to the left of a blue square"
    assert "swap arguments" in negatives(vocab, rel, key="k") and "swap arguments" not in negatives(
        vocab, rel, "k", seen
    )
    sampler = NegativeSampler(vocab, tuple(CATEGORIES), per_caption=3, seen=seen)
    for seed in range(10):
        for edit in sampler(rel, random.Random(seed)) + sampler("a blue square", random.Random(seed)):
            assert read(edit, vocab).facts() <= seen, edit
