"""Batches as every rank must see them: fixed size, on the device, and in lock-step across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from accord import collectives
from accord.modalities import COUNTERFACTUAL


def rows(batch: dict[str, Any]) -> int:
    """The batch's row count (its samples, absent ones included)."""
    return len(next(iter(batch["present"].values())))


def _pad_rows(value: dict[str, Any], extra: int) -> dict[str, Any]:
    """Zero rows after every tensor of a (nested) dict: False in masks, absent samples."""
    return {
        k: _pad_rows(t, extra) if isinstance(t, dict) else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])
        for k, t in value.items()
    }


def pad_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Pad to ``size`` rows with absent samples (masks False), so that every rank gathers equal shapes."""
    n = rows(batch)
    if n == size:
        return batch
    out: dict[str, Any] = {"__key__": batch.get("__key__", []), "__shard__": batch.get("__shard__", [])}
    if "labels" in batch:
        out["labels"] = batch["labels"] + [None] * (size - n)
    for key, value in batch.items():
        if isinstance(value, dict):  # present, each modality's inputs, text_negatives, the counterfactual rows
            out[key] = _pad_rows(value, size - n)
    return out


def empty_batch(modalities: tuple[str, ...], size: int, counterfactuals: bool = False) -> dict[str, Any]:
    """No samples at all: every tower still runs (on a dummy input), every loss term is masked out; with
    ``counterfactuals`` (``data.counterfactuals``) also no pairs, so that it has as many rows as a batch with them."""
    batch: dict[str, Any] = {"present": {m: torch.zeros(size, dtype=torch.bool) for m in modalities}}
    if counterfactuals:
        batch[COUNTERFACTUAL] = {"present": {m: torch.zeros(size, dtype=torch.bool) for m in modalities}}
    return {**batch, "__key__": [], "__shard__": []}


def join_counterfactuals(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch whose rows are its samples followed by their counterfactual pairs (``batch[COUNTERFACTUAL]``, row
    for row): the pairs become samples of the batch, each the other's hard negative. Captions are padded to one
    length; a modality or the hard negatives that one half lacks get zero rows, absent. Unchanged without pairs."""
    pairs = batch.get(COUNTERFACTUAL)
    if pairs is None:
        return batch
    n = rows(pairs)
    present = {  # a batch without masks has every modality it holds
        m: batch.get("present", {}).get(m, torch.full((n,), m in batch, dtype=torch.bool)) for m in pairs["present"]
    }
    out = {k: v for k, v in batch.items() if k != COUNTERFACTUAL}
    out["present"] = {m: torch.cat([p, pairs["present"][m]]) for m, p in present.items()}
    for modality in present:
        found = [half.get(modality) for half in (batch, pairs)]
        like = next((h for h in found if h is not None), None)
        if like is None:
            continue
        halves = [h if h is not None else {k: torch.zeros_like(t) for k, t in like.items()} for h in found]
        if modality == "text":
            length = max(h["input_ids"].shape[1] for h in halves)
            halves = [{k: F.pad(t, (0, length - t.shape[1])) for k, t in h.items()} for h in halves]
        out[modality] = {k: torch.cat([h[k] for h in halves]) for k in like}
    if "text_negatives" in batch:  # the pairs' captions have none
        out["text_negatives"] = _pad_rows(batch["text_negatives"], n)
    if "labels" in batch:
        out["labels"] = batch["labels"] + [None] * n
    return out


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors (of nested dicts too); floating inputs take the towers' dtype (bf16/fp16 runs)."""

    def move(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: move(t) for k, t in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)

    return {k: move(v) for k, v in batch.items()}


def real_samples(batch: dict[str, Any]) -> int:
    """Rows of ``batch`` that hold a sample (some modality present); its counterfactual pairs not counted."""
    present = list(batch["present"].values())
    return int(torch.stack(present).any(dim=0).sum()) if present else 0


def real_pairs(batch: dict[str, Any]) -> int:
    """The samples of ``batch`` that have a counterfactual pair."""
    return real_samples(batch[COUNTERFACTUAL]) if COUNTERFACTUAL in batch else 0


def lockstep(
    batches: Iterator[dict[str, Any]], modalities: tuple[str, ...], size: int, counterfactuals: bool = False
) -> Iterator[dict[str, Any]]:
    """Yield this rank's batches padded to ``size`` until *every* rank is out of data; a rank that runs out
    first yields empty batches meanwhile (with ``counterfactuals``: empty pairs too). In finite mode ranks can hold
    different sample counts."""
    while True:
        batch = next(batches, None)
        more = collectives.all_reduce(torch.tensor([0 if batch is None else 1]), "max")
        if not more.item():
            return
        if batch is None:
            yield empty_batch(modalities, size, counterfactuals)
        else:
            yield pad_batch(batch, size)
