"""Speed of the typed one-edit negatives (accord.data.negatives) per caption: the cost a data loader would pay
for hard negatives.

    .venv/bin/python bench/negatives.py
"""

import time

import numpy as np

from accord.data.negatives import Vocabulary, negatives
from accord.worlds import scenes

rng = np.random.default_rng(0)
caps = []
for i in range(600):
    s = scenes.random_scene(rng, heldout=bool(i % 2))
    caps.append(scenes.caption(s, str(rng.choice(scenes.TEMPLATES[len(s.objects)]))))
v = Vocabulary.from_captions(caps)
t = time.perf_counter()
n = sum(len(negatives(v, c, str(i))) for i, c in enumerate(caps))
dt = time.perf_counter() - t
print(f"captioning world: {len(caps)} captions, {n} negatives, {1000 * dt / len(caps):.2f} ms/caption")
# a larger vocabulary (real captions): 60 nouns
big = caps + [f"a red thing{k} on a table" for k in range(60)]
v2 = Vocabulary.from_captions(big)
t = time.perf_counter()
n = sum(len(negatives(v2, c, str(i))) for i, c in enumerate(caps[:200]))
dt = time.perf_counter() - t
print(f"63-noun vocabulary: 200 captions, {n} negatives, {1000 * dt / 200:.2f} ms/caption")
# the training loader's draw (NegativeSampler: first valid candidate, 2 per caption) with 2,000 nouns
import random  # noqa: E402

from accord.data.negatives import CATEGORIES, NegativeSampler  # noqa: E402

huge = caps + [f"a red thing{k} on a table" for k in range(2000)]
v3 = Vocabulary.from_captions(huge)
t = time.perf_counter()
n = sum(len(negatives(v3, c, str(i))) for i, c in enumerate(caps[:50]))
dt = time.perf_counter() - t
print(f"2,003-noun vocabulary, every valid edit: 50 captions, {n} negatives, {1000 * dt / 50:.1f} ms/caption")
sampler = NegativeSampler(v3, CATEGORIES, per_caption=2)
rng = random.Random(0)
t = time.perf_counter()
n = sum(len(sampler(c, rng)) for c in caps[:200])
dt = time.perf_counter() - t
print(f"2,003-noun vocabulary, the loader's draw: 200 captions, {n} negatives, {1000 * dt / 200:.2f} ms/caption")
