"""``accord eval``: an exported backbone on shards: zero-shot retrieval R@1/5/10 per pair (and R@1 after fusion
reranking), or zero-shot classification with ``--classes``, as open_clip's zero-shot evaluation and
CLIP_benchmark do it.

    accord eval --backbone backbone/ --data shards/ [--plot sim.png] [--rerank 10]
    accord eval --backbone backbone/ --data shards/ --classes classes.txt [--templates templates.txt]
                [--label-key label] [--modality image] [--confusion confusion.png]
    accord eval --backbone backbone/ --data shards/ --compositional [--train-data train_shards/] [--out DIR]
    accord eval --backbone backbone/ --data wds_cifar10/ [--split test] [--results result.json]   # CLIP_benchmark
    accord eval --backbone backbone/ --imagenet-val val/ [--classes names.txt] [--results result.json]

Samples that cannot be used are counted by reason and reported beside the figures, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from accord.consistency.backbone import Backbone, embed_in_chunks, load_backbone
from accord.data.config import DataConfig, TextConfig
from accord.data.loader import Loader
from accord.errors import InputError, command
from accord.evaluation.benchmark import (
    evaluate_set,
    is_wds_benchmark,
    read_image_folder,
    read_wds_benchmark,
    result_row,
)
from accord.evaluation.compositional import compositional_eval
from accord.evaluation.compositional import write as write_compositional
from accord.evaluation.embed import embed_all
from accord.evaluation.plots import confusion_plot, similarity_plot
from accord.evaluation.retrieval import retrieval
from accord.evaluation.zeroshot import DEFAULT_TEMPLATES, class_embeddings, classify, label_index, read_lines
from accord.shards.read import sample_json, shard_items


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
    backbone = load_backbone(backbone_dir)
    if not isinstance(backbone, Backbone):
        raise InputError(f"{backbone_dir}: accord eval needs an exported accord backbone (not a CLIP directory)")
    cfg = DataConfig(
        val=data,
        batch_size=batch_size,
        workers=workers,
        persistent_workers=False,
        max_bad_fraction=1.0,  # an evaluation counts what it could not read (report) instead of stopping
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
        assert backbone.model.fusion is not None  # rerank is refused above without one
        with torch.no_grad():
            return backbone.model.fusion(tt, tm, ot, om, modality)

    if report is not None:
        report.update(loader.report())
    metrics = retrieval(emb, backbone.model.pairs, rerank, match_fn if rerank else None, tokens)
    if plot:
        similarity_plot(emb, backbone.model.pairs, plot)
    return metrics


def zeroshot_eval(
    backbone_dir: str,
    data: str,
    classes_file: str,
    templates_file: str | None = None,
    modality: str | None = None,
    label_key: str = "label",
    batch_size: int = 32,
    confusion_png: str | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of the samples of a shard folder; the metrics and the read / skipped counts."""
    backbone = load_backbone(backbone_dir)
    media = [m for m in backbone.modalities if m != "text"]
    modality = modality or (media[0] if len(media) == 1 else None)
    if modality is None:
        raise InputError(f"--modality: {backbone_dir} has {', '.join(media)} towers; say which to classify")
    if modality not in media:
        raise InputError(f"--modality {modality}: {backbone_dir} has no {modality} tower ({', '.join(media)})")
    classes = read_lines(classes_file, "--classes")
    templates = read_lines(templates_file, "--templates") if templates_file else DEFAULT_TEMPLATES[modality]
    skipped: Counter[str] = Counter()
    inputs, labels = [], []
    read = 0
    for item in shard_items(data, with_json=True):
        if item.get("error"):
            skipped["unreadable"] += item.get("lost", 1)
            continue
        read += 1
        if item.get(modality) is None:
            skipped[f"no {modality}"] += 1
            continue
        meta = sample_json(item)
        if meta is None:
            skipped["json not a JSON object"] += 1
            continue
        if label_key not in meta:
            skipped[f"no {label_key!r} in the sample json"] += 1
            continue
        index = label_index(meta[label_key], classes)
        if index is None:
            skipped["label not in --classes"] += 1
            continue
        inputs.append(item[modality])
        labels.append(index)
    if not inputs:
        raise InputError(
            f"{data}: no sample with a {modality} and a {label_key!r} label from {classes_file} "
            f"(skipped: {dict(skipped) or 'none'})"
        )
    with torch.no_grad():
        class_emb = class_embeddings(lambda t: embed_in_chunks(backbone, "text", t, batch_size), classes, templates)
        features = embed_in_chunks(backbone, modality, inputs, batch_size)
    metrics = classify(features, torch.tensor(labels), class_emb)
    if confusion_png:
        confusion_plot(metrics["confusion"], classes, confusion_png)
    return {
        "modality": modality,
        "templates": len(templates),
        **metrics,
        "samples": {"read": read, "classified": len(inputs), "skipped": dict(skipped)},
    }


@command("accord eval")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord eval",
        description="Zero-shot retrieval R@1/5/10 per pair on shards, or zero-shot classification with --classes.",
    )
    p.add_argument("--backbone", required=True)
    p.add_argument(
        "--data",
        default=None,
        help="shard folder / pattern, or a CLIP_benchmark webdataset folder (SPLIT/nshards.txt, classnames.txt, ...)",
    )
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
    z = p.add_argument_group("zero-shot classification (instead of retrieval; see accord.evaluation.zeroshot)")
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
    c = p.add_argument_group("compositional evaluation (instead of retrieval; see accord.evaluation.compositional)")
    c.add_argument(
        "--compositional",
        action="store_true",
        help="each caption against its one-edit negatives per category, beside blind text-only baselines",
    )
    c.add_argument("--train-data", default=None, help="training shards: the vocabulary and the blind baselines")
    c.add_argument("--out", default=None, help="write compositional.json, .md and .png into this folder")
    b = p.add_argument_group("CLIP_benchmark datasets and results (see accord.evaluation.benchmark)")
    b.add_argument("--split", default="test", help="the split of a CLIP_benchmark webdataset folder")
    b.add_argument("--imagenet-val", default=None, metavar="DIR", help="an ImageFolder: DIR/CLASS/IMAGE (sorted)")
    b.add_argument("--results", default=None, help="write the figures as a CLIP_benchmark result file (JSON)")
    b.add_argument("--dataset-name", default=None, help="its 'dataset' field (default: wds/FOLDER, imagefolder/DIR)")
    args = p.parse_args(argv)
    if (args.data is None) == (args.imagenet_val is None):
        p.error("give one of --data and --imagenet-val")
    if args.imagenet_val or is_wds_benchmark(args.data, args.split):
        return benchmark(args)
    if args.results:
        p.error(
            "--results: CLIP_benchmark result files are written for its datasets (--data WDS_FOLDER, --imagenet-val)"
        )
    if args.compositional:
        result = compositional_eval(args.backbone, args.data, args.train_data, args.batch_size)
        if args.out:
            write_compositional(result, Path(args.out))
        print(json.dumps(result, indent=2))
        if result["samples"]["skipped"]:
            print(f"accord eval: warning: samples not evaluated: {result['samples']['skipped']}", file=sys.stderr)
        return 0
    if args.classes:
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


def benchmark(args: argparse.Namespace) -> int:
    """``accord eval`` on a CLIP_benchmark webdataset folder or an ImageFolder: its metrics, printed and written."""
    if args.imagenet_val:
        data = read_image_folder(args.imagenet_val, args.classes)
        name = args.dataset_name or f"imagefolder/{Path(args.imagenet_val).resolve().name}"
    else:
        data = read_wds_benchmark(args.data, args.split, args.classes)
        name = args.dataset_name or f"wds/{Path(args.data).resolve().name}"
    if args.templates:
        data.templates = read_lines(args.templates, "--templates")
    metrics = evaluate_set(load_backbone(args.backbone), data, args.batch_size)
    row = result_row(name, args.backbone, data.task, metrics)
    print(
        json.dumps(
            {**row, "samples": {"read": data.read, "evaluated": len(data.images), "skipped": data.skipped}}, indent=2
        )
    )
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(row))
    if data.skipped:
        print(
            f"accord eval: warning: {sum(data.skipped.values())} samples not evaluated ({dict(data.skipped)})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
