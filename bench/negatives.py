"""Speed of the typed one-edit negatives (accord.data.negatives) per caption: what the evaluation pays
(``negatives``: one edit per category) and what the training loader pays (``NegativeSampler``: 2 per caption),
on the captioning world's vocabulary and on larger noun vocabularies (real captions).

    .venv/bin/python bench/negatives.py
"""

import itertools
import random
import string
import time

import numpy as np

from accord.data.negatives import CATEGORIES, NegativeSampler, Vocabulary, negatives
from accord.worlds import scenes

rng = np.random.default_rng(0)
caps = []
for i in range(600):
    s = scenes.random_scene(rng, heldout=bool(i % 2))
    caps.append(scenes.caption(s, str(rng.choice(scenes.TEMPLATES[len(s.objects)]))))


def per_caption(extra_nouns: int, n: int) -> None:
    """ms per caption of both draws over the first ``n`` captions, ``extra_nouns`` nouns added to the vocabulary."""
    words = ("".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3))  # nouns: letters only
    vocab = Vocabulary.from_captions(caps + [f"a red zz{w} on a table" for w in itertools.islice(words, extra_nouns)])
    sampler, draw = NegativeSampler(vocab, CATEGORIES, per_caption=2), random.Random(0)
    for name, fn in (
        ("evaluation", lambda i, c: negatives(vocab, c, str(i))),
        ("loader", lambda i, c: sampler(c, draw)),
    ):
        t = time.perf_counter()
        made = sum(len(fn(i, c)) for i, c in enumerate(caps[:n]))
        ms = 1000 * (time.perf_counter() - t) / n
        print(f"{len(vocab.noun)} nouns, {name}: {n} captions, {made} negatives, {ms:.2f} ms/caption")


per_caption(0, 600)
per_caption(60, 200)
per_caption(500, 20)
