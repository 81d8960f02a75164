"""CLIP_benchmark's ground: its webdataset datasets, ImageFolder directories, and its result files.

A CLIP_benchmark webdataset (what ``clip_benchmark_export_wds`` writes, and what its ``wds/...`` datasets on the
Hub are) is a folder with ``SPLIT/nshards.txt`` and ``SPLIT/0.tar ...``, ``classnames.txt``,
``zeroshot_classification_templates.txt`` and ``dataset_type.txt`` (``retrieval``; absent: classification). A
classification sample is an image (webp, png, jpg) and its class index as ``.cls``; a retrieval sample is an image
and its captions, one per line of ``.txt``. An ImageFolder (``--imagenet-val DIR``, torchvision's layout) is one
sub-folder per class, in sorted order; their names are the class names unless a classes file names them.

The figures are CLIP_benchmark's definitions, so that its ``clip_benchmark build`` reads accord's rows beside its
own: ``acc1``, ``acc5`` (NaN below 5 classes), ``mean_per_class_recall`` (balanced accuracy over the classes that
have samples); ``image_retrieval_recall@k`` (a caption finds one of its images in the top k) and
``text_retrieval_recall@k`` (an image finds one of its captions). Its rows are ``{"dataset", "model",
"pretrained", "task", "metrics", "language"}``. Samples that cannot be used are counted by reason, never dropped
silently.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accord.consistency.backbone import Backbone, HFClipBackbone, embed_in_chunks
from accord.errors import InputError
from accord.evaluation.zeroshot import DEFAULT_TEMPLATES, class_embeddings, classify, read_lines
from accord.modalities import MEMBER_EXTS
from accord.shards.read import shard_items

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
RECALL_KS = (1, 5, 10)  # CLIP_benchmark's default recall_k_list


@dataclass
class BenchmarkSet:
    """Images with a class index each (classification) or captions each (retrieval), and what was skipped."""

    task: str
    images: list[bytes | str] = field(default_factory=list)  # shard members' bytes, or an ImageFolder's paths
    labels: list[int] = field(default_factory=list)  # classification: class index per image
    captions: list[list[str]] = field(default_factory=list)  # retrieval: captions per image
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def is_wds_benchmark(root: str, split: str = "test") -> bool:
    """Whether ``root`` is a local CLIP_benchmark webdataset folder with a ``split``."""
    return (Path(root) / split / "nshards.txt").is_file()


def read_wds_benchmark(root: str, split: str = "test", classes_file: str | None = None) -> BenchmarkSet:
    """A CLIP_benchmark webdataset folder's ``split``; ``classes_file`` overrides its ``classnames.txt``."""
    folder = Path(root)
    kind_file = folder / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("retrieval", "classification"):
        raise InputError(f"{kind_file}: accord reads 'classification' and 'retrieval' datasets, not {kind!r}")
    task = RETRIEVAL if kind == "retrieval" else CLASSIFICATION
    data = BenchmarkSet(task)
    if task == CLASSIFICATION:
        names = classes_file or str(folder / "classnames.txt")
        data.classes = read_lines(names, "--classes" if classes_file else "classnames.txt")
        templates = folder / "zeroshot_classification_templates.txt"
        # CLIP_benchmark writes the class as {c}; accord's templates as {}
        lines = read_lines(str(templates), "templates") if templates.is_file() else []
        data.templates = [t.replace("{c}", "{}") for t in lines]
    for item in shard_items(str(folder / split), keep=("cls",)):
        if item.get("error"):
            data.skipped["unreadable"] += item.get("lost", 1)
            continue
        data.read += 1
        if item.get("image") is None:
            data.skipped["no image"] += 1
        elif task == RETRIEVAL:
            captions = [line for line in (item.get("text") or "").splitlines() if line.strip()]
            if not captions:
                data.skipped["no caption"] += 1
                continue
            data.images.append(item["image"])
            data.captions.append(captions)
        else:
            label = _class_index(item.get("cls"), len(data.classes))
            if label is None:
                data.skipped["no class index (.cls) within classnames.txt"] += 1
                continue
            data.images.append(item["image"])
            data.labels.append(label)
    return data


def read_image_folder(root: str, classes_file: str | None = None) -> BenchmarkSet:
    """An ImageFolder: class ``i`` is the ``i``-th sub-folder in sorted order, named by line ``i`` of
    ``classes_file`` when given (ImageNet's folders are WordNet ids), else by the folder's name."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"--imagenet-val {root}: no class sub-folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
    data = BenchmarkSet(CLASSIFICATION)
    data.classes = read_lines(classes_file, "--classes") if classes_file else [p.name for p in folders]
    if len(data.classes) != len(folders):
        raise InputError(f"--classes {classes_file}: {len(data.classes)} names for {len(folders)} class folders")
    images = {f".{e}" for e in MEMBER_EXTS["image"]}
    for label, folder in enumerate(folders):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data.read += 1
            if path.suffix.lower() not in images:
                data.skipped[f"not an image ({path.suffix or 'no extension'})"] += 1
                continue
            data.images.append(str(path))  # read chunk by chunk as it is embedded, not all at once
            data.labels.append(label)
    return data


def _class_index(raw: bytes | None, classes: int) -> int | None:
    try:
        index = int((raw or b"").decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return index if 0 <= index < classes else None


def recall_at_k(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Fraction of the rows of ``scores`` [queries, candidates] with a positive among their top ``k``."""
    top = scores.topk(k, dim=1).indices
    return float(positive.gather(1, top).any(dim=1).float().mean())


def evaluate_set(
    backbone: Backbone | HFClipBackbone, data: BenchmarkSet, batch_size: int = 32, modality: str = "image"
) -> dict[str, float]:
    """CLIP_benchmark's metrics of ``backbone`` (an accord backbone or an exported CLIP directory's) on ``data``."""
    if not data.images:
        raise InputError(f"no usable sample (read {data.read}; skipped: {dict(data.skipped) or 'none'})")

    def embed(kind: str, inputs: list[Any]) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(embed_in_chunks(backbone, kind, inputs, batch_size), dim=-1)

    images = embed(modality, data.images)
    if data.task == CLASSIFICATION:
        templates = data.templates or DEFAULT_TEMPLATES[modality]
        got = classify(
            images, torch.tensor(data.labels), class_embeddings(lambda t: embed("text", t), data.classes, templates)
        )
        return {
            "acc1": got["top1"],
            "acc5": got.get("top5", math.nan),
            "mean_per_class_recall": got["mean_per_class_recall"],
        }
    texts = embed("text", [c for captions in data.captions for c in captions])
    owner = torch.tensor([i for i, captions in enumerate(data.captions) for _ in captions])
    scores = texts @ images.T  # [captions, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    metrics = {}
    for k in RECALL_KS:
        if k <= len(data.images):
            metrics[f"image_retrieval_recall@{k}"] = recall_at_k(scores, positive, k)
        if k <= len(owner):
            metrics[f"text_retrieval_recall@{k}"] = recall_at_k(scores.T, positive.T, k)
    return metrics


def result_row(dataset: str, backbone_dir: str, task: str, metrics: dict[str, float]) -> dict[str, Any]:
    """One CLIP_benchmark result file's content (what ``clip_benchmark eval --output`` writes)."""
    return {
        "dataset": dataset,
        "model": "accord",
        "pretrained": backbone_dir,
        "task": task,
        "metrics": metrics,
        "language": "en",
    }
