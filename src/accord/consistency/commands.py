"""``accord score`` (score a manifest or shard set) and ``accord eval`` (zero-shot retrieval + similarity plot)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from accord.consistency.backbone import DTYPES
from accord.consistency.scorer import ConsistencyScorer, torchmetrics_aggregate
from accord.errors import InputError, command

MEDIA_BY_EXT = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "webp": "image",
    "mp4": "video",
    "webm": "video",
    "mkv": "video",
    "mov": "video",
    "flac": "audio",
    "wav": "audio",
    "ogg": "audio",
    "mp3": "audio",
}


MODS = ("text", "image", "video", "audio")


def manifest_items(path: str) -> Iterator[dict[str, Any]]:
    """Items of a manifest; the manifest is read (and its errors raised) now, its media later."""
    from accord.shards.sources import read_sources

    sources = read_sources(path)
    return (
        {"id": src.origin, "error": src.error} if src.error else {"id": src.origin, "text": src.text, **src.media}
        for src in sources
    )


def shard_items(folder: str, with_json: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of every shard in a folder, streamed (one sample in memory at a time); ``with_json`` adds each
    sample's json bytes as ``"json"``. A shard that yields fewer samples than its sizes.json entry (truncated,
    corrupt) adds one error item naming it and the samples lost."""
    import tarfile

    import fsspec

    from accord.shards.tario import read_tar

    fs, root = fsspec.core.url_to_fs(folder)
    sizes = json.loads(fs.cat(f"{root.rstrip('/')}/sizes.json")) if fs.exists(f"{root.rstrip('/')}/sizes.json") else {}
    for tar in sorted(fs.glob(f"{root.rstrip('/')}/*.tar")):
        name, read, problem = tar.rsplit("/", 1)[-1], 0, None
        try:
            for key, members in read_tar(fs, tar):
                read += 1
                m = dict(members)
                try:
                    text = m["txt"].decode("utf-8") if "txt" in m else None
                except UnicodeDecodeError:
                    yield {"id": key, "error": f"{name}: the caption of {key} is not UTF-8"}
                    continue
                item: dict[str, Any] = {"id": key, "text": text}
                for ext, data in m.items():
                    if ext in MEDIA_BY_EXT:
                        item[MEDIA_BY_EXT[ext]] = data
                if with_json:
                    item["json"] = m.get("json")
                yield item
        except (tarfile.TarError, OSError) as e:
            problem = f"unreadable after {read} samples ({type(e).__name__}: {e})"
        expected = sizes.get(name)
        if problem or (expected is not None and read < expected):
            lost = f"{expected - read} of {expected} samples lost" if expected is not None else "samples lost"
            yield {"id": name, "error": f"{name}: {problem or 'truncated'}; {lost} (sizes.json)"}


def _modalities(item: dict[str, Any]) -> tuple[str, ...]:
    return tuple(m for m in MODS if item.get(m) is not None)


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
    with torch.no_grad():
        result = scorer.score(**{m: [c[m] for c in chunk] for m in mods}, mode=mode)
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
def main_score(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord score", description="Score every sample of a manifest or shard set.")
    p.add_argument("--backbone", required=True, help="exported accord backbone or HF CLIPModel directory")
    p.add_argument("--input", required=True, help="manifest (.jsonl/.csv/.tsv/.parquet) or folder of shards")
    p.add_argument("--out", required=True, help="scores.jsonl")
    p.add_argument("--mode", default="clipscore", choices=("clipscore", "torchmetrics", "cosine", "fused"))
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
    total = None
    if path.is_dir() and (path / "sizes.json").exists():
        total = sum(json.loads((path / "sizes.json").read_text()).values())
    summary_rows = []
    with open(args.out, "w") as f:
        for r in score_items(scorer, items, args.mode, args.batch_size, total=total):
            f.write(json.dumps(r) + "\n")
            summary_rows.append({k: v for k, v in r.items() if k != "id"})
    summary = summarize(summary_rows, args.mode)
    print(json.dumps(summary, indent=2))
    return 0


@command("accord eval")
def main_eval(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord eval",
        description="Zero-shot retrieval R@1/5/10 per pair on shards, or zero-shot classification with --classes.",
    )
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", required=True, help="shard folder / pattern")
    p.add_argument("--plot", default=None, help="similarity-matrix PNG (first pair, first 32 samples)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="also report R@1 after reranking the cosine top-K by the fusion head (text pairs)",
    )
    z = p.add_argument_group("zero-shot classification (instead of retrieval; see accord.consistency.zeroshot)")
    z.add_argument("--classes", default=None, help="class names, one per line")
    z.add_argument(
        "--templates",
        default=None,
        help="prompt templates with {} for the class, one per line "
        "(default: 'a photo of a {}.' and the like per modality)",
    )
    z.add_argument("--label-key", default="label", help="the sample json field holding the class (name or index)")
    z.add_argument("--modality", default=None, choices=("image", "video", "audio"))
    z.add_argument("--confusion", default=None, help="confusion-matrix PNG")
    args = p.parse_args(argv)
    if args.classes:
        from accord.consistency.zeroshot import zeroshot_eval

        result = zeroshot_eval(
            args.backbone,
            args.data,
            args.classes,
            args.templates,
            args.modality,
            args.label_key,
            args.batch_size,
            args.confusion,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))
        if result["samples"]["skipped"]:
            print(
                f"accord eval: warning: {sum(result['samples']['skipped'].values())} samples not classified "
                f"({result['samples']['skipped']})",
                file=sys.stderr,
            )
        return 0
    report: dict[str, Any] = {}
    metrics = evaluate_backbone(
        args.backbone, args.data, args.batch_size, args.workers, args.plot, args.rerank, report=report
    )
    print(json.dumps({**metrics, "samples": report}, indent=2))
    if report["skipped"] or (report["expected"] is not None and report["read"] != report["expected"]):
        reasons = ", ".join(f"{k}: {v}" for k, v in report["skipped"].items()) or "none"
        print(
            f"accord eval: warning: read {report['read']} of {report['expected']} samples that sizes.json "
            f"promises in {args.data} (skipped: {reasons}); the retrieval figures cover the samples read",
            file=sys.stderr,
        )
    return 0


def evaluate_backbone(
    backbone_dir: str,
    data: str,
    batch_size: int = 32,
    workers: int = 0,
    plot: str | None = None,
    rerank: int = 0,
    report: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Retrieval metrics of an exported backbone on held-out shards (eval transforms); ``rerank`` = k adds R@1
    after reranking the cosine top-k by the fusion head; ``report`` receives the loader's read / skipped /
    expected sample counts."""
    from accord.consistency.backbone import Backbone, load_backbone
    from accord.data.config import DataConfig, TextConfig
    from accord.data.loader import Loader
    from accord.train.evaluate import embed_all, retrieval

    backbone = load_backbone(backbone_dir)
    if not isinstance(backbone, Backbone):
        raise InputError(f"{backbone_dir}: accord eval needs an exported accord backbone (not a CLIP directory)")
    cfg = DataConfig(
        val=data,
        batch_size=batch_size,
        workers=workers,
        persistent_workers=False,
        text=TextConfig(tokenizer=str(Path(backbone_dir) / "tokenizer"), max_length=backbone.max_length),
        image=backbone.image_cfg,
        video=backbone.video_cfg,
        audio=backbone.audio_cfg,
    )
    if rerank and not backbone.has_fusion:
        raise InputError(f"--rerank needs a fusion head; {backbone_dir} has none")
    loader = Loader(cfg, backbone.modalities, train=False, rank=0, world=1)
    tokens: dict[str, Any] | None = {} if rerank else None
    dtype = next(backbone.parameters()).dtype
    with torch.no_grad():
        emb = embed_all(backbone.model, loader, backbone.device, dtype, batch_size, tokens=tokens)

    def match_fn(*args: Any) -> torch.Tensor:
        *tensors, modality = args
        tt, tm, ot, om = (t.to(backbone.device) for t in tensors)
        with torch.no_grad():
            return backbone.model.fusion(tt, tm, ot, om, modality)

    if report is not None:
        report.update(loader.report())
    metrics = retrieval(emb, backbone.model.pairs, rerank, match_fn if rerank else None, tokens)
    if plot:
        similarity_plot(emb, backbone.model.pairs, plot)
    return metrics


def similarity_plot(emb: dict[str, Any], pairs: list[tuple[str, str]], path: str, n: int = 32) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for a, b in pairs:
        (ea, pa), (eb, pb) = emb[a], emb[b]
        both = (pa & pb).nonzero()[:, 0][:n]
        if len(both) >= 2:
            break
    else:
        return
    sims = (ea[both] @ eb[both].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sims, cmap="viridis")
    ax.set_xlabel(f"{b} sample")
    ax.set_ylabel(f"{a} sample")
    ax.set_title(f"cosine similarity {a}-{b} (diagonal = matching pairs)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main_score())
