"""Zero-shot classification with an aligned backbone, as open_clip's zero-shot evaluation and CLIP_benchmark do it.

Each class name is written into every prompt template ("a photo of a {}."); the class embedding is the mean of its
prompts' normalised text embeddings, normalised again (the prompt ensemble). A sample's prediction is the class
whose embedding is most similar to the sample's (image, video or audio) embedding. Reported: top-1 and top-5
accuracy, mean per-class recall (balanced accuracy) and the confusion matrix.

    accord eval --backbone backbone/ --data shards/ --classes classes.txt [--templates templates.txt]
                [--label-key label] [--modality image] [--confusion confusion.png]

Labels come from a field of each sample's json (``--label-key``; a manifest's extra column lands there): a class
name from the classes file, or its 0-based index. Samples without the field, with an unknown label or without the
modality are counted as skipped, by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accord.errors import InputError

DEFAULT_TEMPLATES = {"image": ["a photo of a {}."], "video": ["a video of a {}."], "audio": ["the sound of a {}."]}


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (class names, templates)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{what} {path}: no lines")
    return lines


def class_embeddings(
    embed_text: Callable[[list[str]], torch.Tensor], classes: list[str], templates: list[str]
) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised embeddings."""
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise InputError(f"templates: {bad[0]!r} has no '{{}}' for the class name")
    prompts = [t.format(c) for c in classes for t in templates]
    emb = F.normalize(embed_text(prompts).float(), dim=-1).view(len(classes), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def classify(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, ks: Iterable[int] = (1, 5)
) -> dict[str, Any]:
    """Accuracy at k, mean per-class recall and the confusion matrix [true, predicted] of ``features`` [N, D]
    against class embeddings [C, D]. Mean per-class recall averages over the classes that have samples."""
    logits = F.normalize(features.float(), dim=-1) @ classes.T
    n, c = logits.shape
    out: dict[str, Any] = {"n": n, "classes": c}
    for k in ks:
        if k <= c:
            top = logits.topk(k, dim=1).indices
            out[f"top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean())
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)
    present = confusion.sum(dim=1) > 0
    out["mean_per_class_recall"] = float(per_class[present].mean())
    out["confusion"] = confusion.tolist()
    return out


def label_index(value: Any, classes: list[str]) -> int | None:
    """A json label (class name or index) -> its index, or None when it names no class."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(classes) else None
    if isinstance(value, str):
        try:
            return classes.index(value.strip())
        except ValueError:
            return None
    return None


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
    import json

    from accord.consistency.backbone import load_backbone
    from accord.consistency.commands import shard_items

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
            skipped["unreadable"] += 1
            continue
        read += 1
        if item.get(modality) is None:
            skipped[f"no {modality}"] += 1
            continue
        meta = json.loads(item["json"]) if item.get("json") else {}
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
        class_emb = class_embeddings(
            lambda texts: torch.cat(
                [backbone.embed("text", texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
            ),
            classes,
            templates,
        )
        features = torch.cat(
            [backbone.embed(modality, inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        )
    metrics = classify(features, torch.tensor(labels), class_emb)
    if confusion_png:
        confusion_plot(metrics["confusion"], classes, confusion_png)
    return {
        "modality": modality,
        "templates": len(templates),
        **metrics,
        "samples": {"read": read, "classified": len(inputs), "skipped": dict(skipped)},
    }


def confusion_plot(confusion: list[list[int]], classes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(confusion, dtype=torch.float)
    m = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion (row-normalised)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
