"""``accord experiment compositional``: what the captioning world's consistency score sees, per kind of edit.

    accord experiment compositional [--quick] [--seeds 0 1 2] [--out DIR]

Per seed it builds the captioning world and trains its backbone (as ``accord experiment captioning`` does, reusing
a world built with the same plan and seed), renders Winoground-style minimal pairs of held-out scenes, and runs the
compositional evaluation (:mod:`accord.evaluation.compositional`) on the held-out scenes and on the pairs, with the
blind baselines trained on the world's training captions. Writes ``OUT/compositional.md`` and ``.json`` (mean +-
std over seeds per category and score) and each seed's own report under ``OUT/seed<S>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from accord.errors import command
from accord.evaluation.compositional import compositional_eval, write
from accord.experiments.captioning import PLANS, prepare_world
from accord.pipeline import build_shards
from accord.worlds.scenes import write_minimal_pairs

PAIRS = {"quick": 24, "full": 150}


def run_seed(out: Path, plan_name: str, seed: int, port: int) -> dict[str, Any]:
    """The world, backbone and evaluation of one seed; the evaluation's result (with the pairs' groups)."""
    backbone, train, heldout = prepare_world(out / "world", PLANS[plan_name], seed, port)
    pairs = out / "world" / "shards" / "pairs"
    if not (pairs / "sizes.json").exists():
        write_minimal_pairs(out / "world" / "raw" / "pairs", PAIRS[plan_name], seed=seed + 1000)
        build_shards(out / "world" / "raw" / "pairs", pairs, samples_per_shard=100)
    result = compositional_eval(str(backbone), str(heldout), str(train))
    groups = compositional_eval(str(backbone), str(pairs), str(train))
    result["media"]["image"]["winoground"] = groups["media"]["image"]["winoground"]
    write(result, out)
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """category -> figure -> (mean, std) over seeds, for the image medium."""
    table: dict[str, dict[str, tuple[float, float]]] = {}

    def add(category: str, figure: str, values: list[float]) -> None:
        values = [v for v in values if v is not None]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table.setdefault(category, {})[figure] = (statistics.fmean(values), std)

    categories = results[0]["media"]["image"]["categories"]
    for category in categories:
        entries = [r["media"]["image"]["categories"].get(category) for r in results]
        entries = [e for e in entries if e is not None]
        for score in entries[0]["scores"]:
            add(category, score, [e["scores"][score]["all"] for e in entries])
        for blind in entries[0]["blind"]:
            add(category, f"blind: {blind}", [e["blind"][blind] for e in entries])
        add(category, "text probe cos", [e["text_probe_cos"]["mean"] for e in entries if "text_probe_cos" in e])
        add(category, "n", [e["n"] for e in entries])
    for score in ("cosine", "fused"):
        values = [r["media"]["image"]["winoground"].get(score, {}).get("group") for r in results]
        add("Winoground-style group", score, values)
    return table


def markdown(table: dict[str, dict[str, tuple[float, float]]], seeds: list[int]) -> str:
    figures = [
        f
        for f in ("cosine", "fused", "blind: bag of words", "blind: bigram", "text probe cos", "n")
        if any(f in row for row in table.values())
    ]
    lines = [f"| category | {' | '.join(figures)} |", "|---" * (len(figures) + 1) + "|"]
    for category, row in table.items():
        cells = []
        for f in figures:
            if f not in row:
                cells.append("-")
            elif f == "n":
                cells.append(f"{row[f][0]:.0f}")
            else:
                cells.append(f"{row[f][0]:.3f} +- {row[f][1]:.3f}")
        lines.append(f"| {category} | {' | '.join(cells)} |")
    return "\n".join(lines) + (
        f"\n\nHeld-out scenes of the captioning world; mean +- std over seeds {seeds} (each seed its own world and "
        "backbone). Share of samples whose caption scores above its one-edit negative (0.5: blind to the edit).\n"
    )


@command("accord experiment compositional")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord experiment compositional",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="bench_out/compositional")
    p.add_argument("--quick", action="store_true", help="the small world (a few minutes a seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--port", type=int, default=29601)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    plan = "quick" if args.quick else "full"
    results = [run_seed(out / f"seed{s}", plan, s, args.port) for s in tqdm(args.seeds, desc="seeds", unit="seed")]
    table = summarise(results)
    md = markdown(table, args.seeds)
    (out / "compositional.json").write_text(json.dumps({"seeds": args.seeds, "plan": plan, "summary": table}, indent=1))
    (out / "compositional.md").write_text(md)
    print("\n" + md + f"\n{out / 'compositional.md'}")
    return 0
