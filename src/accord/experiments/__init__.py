"""``accord experiment NAME``: experiments that train, decode and score, and write a table (markdown + JSON) and a plot.

accord experiment fusion [--quick]       cosine vs fused consistency score on one-attribute-wrong captions
accord experiment captioning [--quick]   the captioning world's backbones (v2's, the compositional winner, CoCa-style)
                                    guiding zero-shot (MAGIC, CLIPRe), decoding and training strategies with
                                    standardised, ensembled and fluency-guarded scores, tuned on validation scenes,
                                    judged by a scene referee, with gaming index and score-referee Spearman
                                    (--backbone DIR --data SHARDS --val SHARDS: any backbone and shards)
accord experiment recipes [--quick]      text tower from scratch / frozen / tuned, temperatures, image tower
                                    sizes, scored on held-out paraphrases over seeds
accord experiment compositional [--quick]  what the captioning world's score sees per kind of edit; --recipes:
                                    the backbone recipe study (docs/recipes.md)
"""

from __future__ import annotations

import importlib
import sys

EXPERIMENTS = {
    "fusion": "accord.experiments.fusion",
    "captioning": "accord.experiments.captioning",
    "recipes": "accord.experiments.recipes",
    "compositional": "accord.experiments.compositional",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"accord experiment: unknown experiment {argv[0]!r} (valid: {', '.join(EXPERIMENTS)})", file=sys.stderr
            )
            return 2
        return 0
    return importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])
