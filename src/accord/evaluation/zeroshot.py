"""Zero-shot classification with an aligned backbone, as open_clip's zero-shot evaluation and CLIP_benchmark do it.

Each class name is written into every prompt template ("a photo of a {}."); the class embedding is the mean of its
prompts' normalised text embeddings, normalised again (the prompt ensemble). A sample's prediction is the class
whose embedding is most similar to the sample's (image, video or audio) embedding. Reported: top-1 and top-5
accuracy, mean per-class recall (balanced accuracy) and the confusion matrix.

The library of both ``accord eval --classes`` (an exported backbone on shards, :mod:`accord.evaluation.evaluate`)
and the trainer's ``eval.zeroshot`` (:func:`zeroshot_metrics` on the gathered validation embeddings). Labels come
from a field of each sample's json: a class name from the classes file, or its 0-based index. Samples without a
label or with an unknown one are counted as skipped, by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accord.data.batches import to_device
from accord.data.transforms import SampleDecoder, collate
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


@torch.no_grad()
def embed_prompts(
    model: Any, decoder: SampleDecoder, texts: list[str], device: torch.device, dtype: torch.dtype, batch_size: int = 64
) -> torch.Tensor:
    """[N, D] text embeddings of ``texts`` by a training model's text tower, tokenised as the loader does."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [
            torch.tensor(decoder.tokenizer(t, truncation=True, max_length=decoder.cfg.text.max_length)["input_ids"])
            for t in texts[i : i + batch_size]
        ]
        samples = [{"__key__": str(j), "text": x} for j, x in enumerate(ids)]
        batch = collate(samples, decoder, decoder.tokenizer.pad_token_id or 0)
        inputs = to_device(batch, device, dtype)["text"]
        out.append(model.embed("text", inputs, None, len(ids))[0].embedding.float().cpu())
    return torch.cat(out)


def zeroshot_metrics(
    embeddings: dict[str, Any],
    labels: list[Any],
    modality: str,
    classes: list[str],
    templates: list[str],
    embed_text: Callable[[list[str]], torch.Tensor],
) -> dict[str, float]:
    """``{"zeroshot/<modality>/top1": ...}``: the gathered samples of :func:`accord.evaluation.embed.embed_all`
    (``labels`` row by row) classified against the prompt-ensembled class embeddings that ``embed_text`` gives."""
    class_emb = class_embeddings(embed_text, classes, templates)
    features, present = embeddings[modality]
    skipped: Counter[str] = Counter()
    rows, targets = [], []
    for row, (has, label) in enumerate(zip(present.tolist(), labels, strict=True)):
        if not has:
            continue
        index = label_index(label, classes)
        if index is None:
            skipped["no label" if label is None else "label not in classes"] += 1
            continue
        rows.append(row)
        targets.append(index)
    prefix = f"zeroshot/{modality}"
    out: dict[str, float] = {f"{prefix}/n": len(rows), **{f"{prefix}/skipped/{k}": v for k, v in skipped.items()}}
    if rows:
        result = classify(features[rows], torch.tensor(targets), class_emb)
        out.update(
            {f"{prefix}/{k}": v for k, v in result.items() if k.startswith("top") or k == "mean_per_class_recall"}
        )
    return out
