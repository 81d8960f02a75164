"""What the generative head (model.generative, issue #27) costs: step time and peak memory of joint training against
the contrastive-only run, same config, data, ranks and steps.

Trains ``configs/captioning_world.yaml`` (the captioning world's backbone: cut-layer MiniLM, 4-layer ViT, fusion
head, hard negatives) on 2 CPU ranks (deepspeed launcher, ZeRO-2) for ``--steps`` steps, three ways: without the
head, with it (``null_weight`` 0.25, the default: two decoder passes per pair), and with ``null_weight`` 0 (CoCa's
single pass). Steady state: samples/s over the logged windows after the first two; peak RSS: the largest rank's.
The world's shards are rendered on first use under bench/_work (or give ``--data``).

    python bench/generative.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "generative"
HEAD = "model.generative={dim: 64, layers: 2, heads: 4"
RUNS = {
    "contrastive only": (),
    "+ generative head": (HEAD + "}",),
    "+ generative head, null_weight 0": (HEAD + ", null_weight: 0}",),
}


def world_shards() -> Path:
    from accord.experiments.scene_world import PLANS, build_world

    train, _ = build_world(WORK / "world", PLANS["full"], seed=0)
    return train


def run(name: str, overrides: tuple[str, ...], data: Path, steps: int, port: int) -> dict:
    from accord.pipeline import launch_training

    out = WORK / name.replace(" ", "_").replace(",", "").replace("+", "with")
    launch_training(
        data,
        data,
        out,
        epochs=100,
        port=port,
        config="captioning_world.yaml",
        overrides=(
            f"max_steps={steps}",
            "log.every=10",
            "data.val=null",
            "data.batch_size=32",  # as the compositional study's runs (global batch 64)
            "checkpoint.every=1000000",
            *overrides,
        ),
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_s" in r]
    steady = [r["samples_per_s"] for r in rows[2:]] or [r["samples_per_s"] for r in rows]
    return {
        "samples_per_s": statistics.fmean(steady),
        "peak_rss_mib": max(max(r["peak_rss_mib_per_rank"]) for r in rows),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data", type=Path, default=None, help="captioning-world training shards (default: rendered)")
    p.add_argument("--port", type=int, default=29641)
    args = p.parse_args()
    data = args.data or world_shards()
    results = {name: run(name, overrides, data, args.steps, args.port) for name, overrides in RUNS.items()}
    base = results["contrastive only"]["samples_per_s"]
    lines = ["| run | samples/s | step time vs contrastive | peak RSS (MiB, largest rank) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['samples_per_s']:.1f} | {base / r['samples_per_s']:.2f}x | {r['peak_rss_mib']:.0f} |"
        )
    print("\n".join(lines))
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
