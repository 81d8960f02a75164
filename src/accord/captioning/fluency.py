"""A fluency head: tells real captions from corrupted ones, so a decoder that games a consistency score with broken
text pays for it (the grammar term of Cho et al. 2022, "Fine-grained Image Captioning with CLIP Reward").

Negatives are real captions with one corruption of :data:`CORRUPTIONS`: a word or a two-word span repeated, a word
dropped, a random vocabulary word inserted, two different words swapped, or every word shuffled. A corrupted caption
that equals a real one is not a negative. The head is a small convolutional n-gram model over generator indices
(:mod:`accord.captioning.vocab`), independent of the backbone whose score it guards; its score is
``log sigmoid(logit)``, the log-probability that a caption is real (0 for a fluent caption, very negative for a
broken one).

A head that reads words learns which words go together in the training captions, so it also calls a held-out
combination ("a red square" when red squares are never captioned in training) less fluent than a changed caption
that names a seen one: added to a guide it works against the compositional generalisation the guide exists to
reward. With ``classes`` (:func:`word_classes`) the head reads every word of a class that the caption edits know
(colours, sizes, nouns, directions, pitches, rhythms, and the relation words side by side or stacked) as its class,
so it judges syntax only: two captions that differ in such words alone get the same score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from accord.captioning.vocab import BOS, EOS, PAD, CaptionVocab
from accord.data.negatives import INVERSE, Vocabulary

CORRUPTIONS = ("repeat", "drop", "insert", "swap", "shuffle")
FIRST_WORD = 3  # generator indices below it are PAD / BOS / EOS


def _repeat(words: list[int], rng: np.random.Generator, vocab: int) -> list[int]:
    n = min(len(words), int(rng.integers(1, 3)))
    i = int(rng.integers(len(words) - n + 1))
    return words[: i + n] + words[i : i + n] + words[i + n :]


def _drop(words: list[int], rng: np.random.Generator, vocab: int) -> list[int]:
    i = int(rng.integers(len(words)))
    return words[:i] + words[i + 1 :]


def _insert(words: list[int], rng: np.random.Generator, vocab: int) -> list[int]:
    i = int(rng.integers(len(words) + 1))
    return words[:i] + [int(rng.integers(FIRST_WORD, vocab))] + words[i:]


def _swap(words: list[int], rng: np.random.Generator, vocab: int) -> list[int]:
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]]
    if not pairs:
        return list(words)
    i, j = pairs[int(rng.integers(len(pairs)))]
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return out


def _shuffle(words: list[int], rng: np.random.Generator, vocab: int) -> list[int]:
    return [words[i] for i in rng.permutation(len(words))]


_CORRUPT: dict[str, Callable[[list[int], np.random.Generator, int], list[int]]] = {
    "repeat": _repeat,
    "drop": _drop,
    "insert": _insert,
    "swap": _swap,
    "shuffle": _shuffle,
}


def words_of(seq: torch.Tensor | list[int]) -> list[int]:
    """The word indices of a generator sequence (BOS dropped, cut at the first EOS)."""
    out = []
    for t in seq.tolist() if torch.is_tensor(seq) else seq:
        if t == EOS:
            break
        if t not in (PAD, BOS):
            out.append(int(t))
    return out


def corrupt(words: list[int], kind: str, rng: np.random.Generator, vocab: int) -> list[int]:
    """``words`` (generator word indices) with one corruption of ``kind`` (see :data:`CORRUPTIONS`); ``vocab``: the
    generator vocabulary's size (inserted words are drawn from its words)."""
    if kind not in _CORRUPT:
        raise ValueError(f"corruption: {kind!r} is not one of {', '.join(CORRUPTIONS)}")
    if not words:
        return []
    return _CORRUPT[kind](list(words), rng, vocab)


# a relation's word and its inverse's ("left" / "right", "above" / "below"): the same syntactic role
RELATION_CLASSES = tuple({tuple(sorted((r.split()[0], INVERSE[r].split()[0]))) for r in INVERSE})


def word_classes(vocab: CaptionVocab, words: Vocabulary) -> torch.Tensor:
    """[len(vocab)]: each generator index -> the first index of its word class (every colour of ``words`` -> the
    first colour's, ...; :data:`RELATION_CLASSES` likewise), itself for a word of no class. Words the tokenizer cuts
    into pieces keep their pieces."""
    out = torch.arange(len(vocab))
    tokens = vocab.tokenizer.convert_ids_to_tokens(vocab.token_ids.tolist())
    index = {t: i for i, t in enumerate(tokens) if i >= FIRST_WORD}
    classes = [words.colour, words.size, words.noun, words.direction, words.pitch, words.rhythm, *RELATION_CLASSES]
    for members in classes:
        found = [index[w] for w in members if w in index]
        for i in found:
            out[i] = found[0]
    return out


def _classed(words: list[int], classes: torch.Tensor | None) -> list[int]:
    return words if classes is None else [int(classes[w]) for w in words]


def negatives(
    targets: torch.Tensor,
    vocab: int,
    rng: np.random.Generator,
    real: set[tuple[int, ...]] | None = None,
    classes: torch.Tensor | None = None,
) -> dict[str, list[list[int]]]:
    """Per corruption type, one corrupted copy of every caption of ``targets`` ([N, T] generator sequences) that
    differs from every caption in ``real`` (default: the captions of ``targets``); a caption whose corruption is
    real (a shuffle of a one-word caption, a swap that gives another true caption) has none of that type. With
    ``classes`` (:func:`word_classes`) captions and corruptions are compared, and returned, as word classes: a swap
    of two colours is no negative."""
    captions = [_classed(words_of(t), classes) for t in targets]
    real = real if real is not None else {tuple(c) for c in captions}
    out: dict[str, list[list[int]]] = {}
    for kind in CORRUPTIONS:
        corrupted = (_classed(corrupt(c, kind, rng, vocab), classes) for c in captions if c)
        out[kind] = [bad for bad in corrupted if tuple(bad) not in real]
    return out


def pad_words(rows: list[list[int]], length: int) -> torch.Tensor:
    """Word lists -> [N, length + 1] generator sequences: words (capped at ``length``), EOS, PAD."""
    out = torch.full((len(rows), length + 1), PAD, dtype=torch.long)
    for i, words in enumerate(rows):
        words = words[:length]
        out[i, : len(words) + 1] = torch.tensor([*words, EOS])
    return out


@dataclass
class FluencyConfig:
    """How :func:`train_fluency` builds and trains the head."""

    dim: int = 64
    """Channels of the embedding and the convolutions."""
    layers: int = 2
    """Width-3 convolutions (2: each output sees 5 consecutive words)."""
    max_len: int = 32
    """Longest caption read, in words (longer ones are cut; corruptions may add words)."""
    epochs: int = 6
    """Passes over the real captions (each with a fresh corruption of every type per pass)."""
    batch_size: int = 64
    """Captions per step (real and corrupted)."""
    lr: float = 2e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seeds the weights, the corruptions and the batch order."""


class FluencyHead(nn.Module):
    """``logits(seqs)``: is each caption (generator indices, EOS-terminated, PAD after) real? ``score``: its log
    probability of being real. Two width-3 convolutions over the word embeddings (BOS and EOS included, so a caption
    that starts or ends wrongly shows) and a max over positions: every corruption type leaves a word trigram that real
    captions do not have, wherever it is. ``classes`` (:func:`word_classes`): each word is read as its class."""

    def __init__(self, vocab: int, cfg: FluencyConfig, classes: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.classes: torch.Tensor
        self.register_buffer("classes", torch.arange(vocab) if classes is None else classes.clone())  # identity: words
        self.embed = nn.Embedding(vocab, cfg.dim, padding_idx=PAD)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.dim, cfg.dim, 3, padding=1) for _ in range(cfg.layers))
        self.out = nn.Linear(cfg.dim, 1)

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """[M] real-vs-corrupted logits of ``seqs`` [M, T] (a leading BOS is ignored; words after EOS are not read)."""
        seqs = seqs[:, 1:] if len(seqs) and bool((seqs[:, 0] == BOS).all()) else seqs
        seqs = self.classes[seqs[:, : self.cfg.max_len + 1]]
        seqs[(seqs == EOS).cumsum(1) - (seqs == EOS).long() > 0] = PAD  # everything after the first EOS
        seqs = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs], dim=1)
        keep = (seqs != PAD)[:, None, :]
        h = self.embed(seqs).transpose(1, 2)  # [M, dim, T]
        for conv in self.convs:
            h = torch.relu(conv(h * keep))
        return self.out(h.masked_fill(~keep, float("-inf")).max(dim=2).values)[:, 0]

    @torch.no_grad()
    def score(self, seqs: torch.Tensor) -> torch.Tensor:
        """Log-probability [M] that each caption is real."""
        was = self.training
        self.eval()
        out = F.logsigmoid(self.logits(seqs.to(self.out.weight.device)).float())
        self.train(was)
        return out


def train_fluency(
    targets: torch.Tensor,
    vocab: int,
    cfg: FluencyConfig | None = None,
    progress: bool = True,
    classes: torch.Tensor | None = None,
) -> FluencyHead:
    """A :class:`FluencyHead` trained on the real captions ``targets`` ([N, T] generator sequences, BOS first as
    :meth:`CaptionVocab.encode` writes them) against one corruption of every type per caption and epoch (balanced:
    each real caption is weighted by the number of its negatives); reading word ``classes`` when given
    (:func:`word_classes`). Left in eval mode."""
    cfg = cfg or FluencyConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = FluencyHead(vocab, cfg, classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.01)
    real_rows = [_classed(words_of(t), classes) for t in targets]
    real = {tuple(c) for c in real_rows}
    for _ in tqdm(range(cfg.epochs), desc="train fluency head", unit="epoch", disable=not progress):
        bad = [c for rows in negatives(targets, vocab, rng, real, classes).values() for c in rows]
        seqs = pad_words(real_rows + bad, cfg.max_len)
        labels = torch.cat([torch.ones(len(real_rows)), torch.zeros(len(bad))])
        weights = torch.cat([torch.full((len(real_rows),), len(bad) / len(real_rows)), torch.ones(len(bad))])
        order = torch.from_numpy(rng.permutation(len(seqs)))
        head.train()
        for i in range(0, len(seqs), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.binary_cross_entropy_with_logits(head.logits(seqs[idx]), labels[idx], weight=weights[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    return head


@torch.no_grad()
def fluency_accuracy(head: FluencyHead, targets: torch.Tensor, vocab: int, seed: int = 1) -> dict[str, float]:
    """On captions ``targets`` (held out from the head's training): the share of real captions it calls real
    (``real``), and per corruption type the share of corrupted copies it calls corrupted (a logit threshold of 0)."""
    rng = np.random.default_rng(seed)
    real_rows = [words_of(t) for t in targets]
    out = {"real": float((head.logits(pad_words(real_rows, head.cfg.max_len)) > 0).float().mean())}
    for kind, rows in negatives(targets, vocab, rng, classes=head.classes).items():
        out[kind] = (
            float((head.logits(pad_words(rows, head.cfg.max_len)) <= 0).float().mean()) if rows else float("nan")
        )
    return out
