"""Blind baselines: text-only models that never see the medium (SugarCrepe's check). A benchmark item that a blind
model solves (it prefers the true caption over its edit from the text alone) measures language priors, not
vision: a category where a blind model beats 0.5 by more than 0.03 is biased.

Both models are trained on the training captions with add-one smoothing and score a caption by its log-likelihood:
``bag of words`` (unigrams: blind to word order by construction) and ``bigram`` (word order within two words).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


class NgramLM:
    """An add-one smoothed n-gram model (n = 1: a bag of words) over the words of its training captions."""

    def __init__(self, captions: Iterable[str], n: int):
        self.n = n
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.context: Counter[tuple[str, ...]] = Counter()
        vocab = {EOS, UNK}
        for caption in captions:
            words = tokens(caption)
            vocab.update(words)
            seq = [BOS] * (n - 1) + words + [EOS]
            for i in range(n - 1, len(seq)):
                gram = tuple(seq[i - n + 1 : i + 1])
                self.counts[gram] += 1
                self.context[gram[:-1]] += 1
        self.vocab = vocab

    def logp(self, caption: str) -> float:
        words = [w if w in self.vocab else UNK for w in tokens(caption)]
        seq = [BOS] * (self.n - 1) + words + [EOS]
        total = 0.0
        for i in range(self.n - 1, len(seq)):
            gram = tuple(seq[i - self.n + 1 : i + 1])
            total += math.log((self.counts[gram] + 1) / (self.context[gram[:-1]] + len(self.vocab)))
        return total


def blind_models(train_captions: list[str]) -> dict[str, NgramLM]:
    return {"bag of words": NgramLM(train_captions, 1), "bigram": NgramLM(train_captions, 2)}


def same_bag_of_words(a: str, b: str) -> bool:
    """The two captions use the same words the same number of times (a swap of arguments or of a binding)."""
    return Counter(tokens(a)) == Counter(tokens(b))
