"""``accord score``: the consistency score of every sample of a manifest or a shard folder, as JSON lines.

    accord score --backbone backbone/ --input captions.jsonl --out scores.jsonl --mode clipscore

Each sample (a caption and at least one medium) gets its per-pair scores and their aggregate; a sample that
cannot be scored gets an error row naming it, and a shard that holds fewer samples than sizes.json says gets one
(``accord.shards.read``), so every input is accounted for. Modes: :mod:`accord.consistency.scorer`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from accord.consistency.backbone import DTYPES
from accord.consistency.scorer import MODES, ConsistencyScorer, Mode, torchmetrics_aggregate
from accord.errors import InputError, command
from accord.modalities import MODALITIES
from accord.shards.read import manifest_items, read_sizes, shard_items


def _modalities(item: dict[str, Any]) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if item.get(m) is not None)


def score_items(
    scorer: ConsistencyScorer,
    items: Iterable[dict[str, Any]],
    mode: str,
    batch_size: int,
    progress: bool = True,
    total: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Score a stream of items; consecutive items with the same modalities form one batch. Yields one row per
    item: its per-pair scores and aggregate, or the error that kept it from being scored."""
    bar = tqdm(total=total, desc="score", unit="sample", disable=not progress)
    chunk: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        if not chunk:
            return
        mods = _modalities(chunk[0])
        try:
            yield from _score_chunk(scorer, chunk, mods, mode)
        except Exception:  # one bad input must not lose the batch: score one by one, naming the failures
            for c in chunk:
                try:
                    yield from _score_chunk(scorer, [c], mods, mode)
                except Exception as e:
                    yield {"id": c["id"], "error": f"{type(e).__name__}: {e}"}
        bar.update(len(chunk))
        chunk.clear()

    for item in items:
        if item.get("error") or len(_modalities(item)) < 2:
            yield from flush()
            yield {"id": item["id"], "error": item.get("error") or "fewer than two modalities"}
            bar.update()
            continue
        if chunk and (_modalities(chunk[0]) != _modalities(item) or len(chunk) >= batch_size):
            yield from flush()
        chunk.append(item)
    yield from flush()
    bar.close()


def _score_chunk(
    scorer: ConsistencyScorer, chunk: list[dict[str, Any]], mods: tuple[str, ...], mode: str
) -> list[dict[str, Any]]:
    inputs: dict[str, Any] = {m: [c[m] for c in chunk] for m in mods}
    with torch.no_grad():
        result = scorer.score(**inputs, mode=cast(Mode, mode))
    return [
        {"id": c["id"], **{p: float(v[k]) for p, v in result.pairs.items()}, "aggregate": float(result.aggregate[k])}
        for k, c in enumerate(chunk)
    ]


def summarize(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    keys = sorted({k for r in rows for k in r if k not in ("id", "error")})
    out: dict[str, Any] = {"scored": sum("error" not in r for r in rows), "errors": sum("error" in r for r in rows)}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "min": min(vals), "max": max(vals)}
        if mode == "torchmetrics":
            out[k]["torchmetrics_clip_score"] = float(torchmetrics_aggregate(torch.tensor(vals)))
    return out


@command("accord score")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord score", description="Score every sample of a manifest or shard set.")
    p.add_argument("--backbone", required=True, help="exported accord backbone or HF CLIPModel directory")
    p.add_argument("--input", required=True, help="manifest (.jsonl/.csv/.tsv/.parquet) or folder of shards")
    p.add_argument("--out", required=True, help="scores.jsonl")
    p.add_argument("--mode", default="clipscore", choices=tuple(m for m in MODES if m != "refclip"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="tower precision (bf16/fp16 for GPUs); scores are computed in fp32",
    )
    args = p.parse_args(argv)
    path = Path(args.input)
    if "://" not in args.input and not path.exists():
        raise InputError(f"--input {args.input}: no such file or directory")
    scorer = ConsistencyScorer.from_pretrained(args.backbone, device=args.device, dtype=DTYPES[args.dtype])
    items = shard_items(args.input) if path.is_dir() else manifest_items(args.input)
    total = sum(read_sizes(args.input).values()) or None if path.is_dir() else None
    summary_rows = []
    with open(args.out, "w") as f:
        for r in score_items(scorer, items, args.mode, args.batch_size, total=total):
            f.write(json.dumps(r) + "\n")
            summary_rows.append({k: v for k, v in r.items() if k != "id"})
    summary = summarize(summary_rows, args.mode)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
