"""Batches as every rank must see them: fixed size, on the device, and in lock-step across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from accord import collectives
from accord.data.rows import pad_rows, rows
from accord.modalities import COUNTERFACTUAL


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
            out[key] = pad_rows(value, size - n)
    return out


def empty_batch(modalities: tuple[str, ...], size: int, counterfactuals: bool = False) -> dict[str, Any]:
    """No samples at all: every tower still runs (on a dummy input), every loss term is masked out; with
    ``counterfactuals`` (``data.counterfactuals``) also no pairs, so that it has as many rows as a batch with them."""
    batch: dict[str, Any] = {"present": {m: torch.zeros(size, dtype=torch.bool) for m in modalities}}
    if counterfactuals:
        batch[COUNTERFACTUAL] = {"present": {m: torch.zeros(size, dtype=torch.bool) for m in modalities}}
    return {**batch, "__key__": [], "__shard__": []}


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
