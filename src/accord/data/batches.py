"""Batches as every rank must see them: fixed size, on the device, and in lock-step across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from accord import collectives


def pad_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Pad to ``size`` rows with absent samples (masks False), so that every rank gathers equal shapes."""
    n = len(next(iter(batch["present"].values())))
    if n == size:
        return batch
    out: dict[str, Any] = {
        "present": {m: torch.cat([p, p.new_zeros(size - n)]) for m, p in batch["present"].items()},
        "__key__": batch.get("__key__", []),
        "__shard__": batch.get("__shard__", []),
    }
    if "labels" in batch:
        out["labels"] = batch["labels"] + [None] * (size - n)
    for key, value in batch.items():
        if isinstance(value, dict) and key != "present":
            out[key] = {k: torch.cat([t, t.new_zeros((size - n, *t.shape[1:]))]) for k, t in value.items()}
    return out


def empty_batch(modalities: tuple[str, ...], size: int) -> dict[str, Any]:
    """No samples at all: every tower still runs (on a dummy input), every loss term is masked out."""
    return {"present": {m: torch.zeros(size, dtype=torch.bool) for m in modalities}, "__key__": [], "__shard__": []}


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors; floating inputs take the towers' dtype (bf16/fp16 runs)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, non_blocking=True)

    return {k: ({n: move(t) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}


def real_samples(batch: dict[str, Any]) -> int:
    present = list(batch["present"].values())
    return int(torch.stack(present).any(dim=0).sum()) if present else 0


def lockstep(batches: Iterator[dict[str, Any]], modalities: tuple[str, ...], size: int) -> Iterator[dict[str, Any]]:
    """Yield this rank's batches padded to ``size`` until *every* rank is out of data; a rank that runs out
    first yields empty batches meanwhile. In finite mode ranks can hold different sample counts."""
    while True:
        batch = next(batches, None)
        more = collectives.all_reduce(torch.tensor([0 if batch is None else 1]), "max")
        if not more.item():
            return
        if batch is None:
            yield empty_batch(modalities, size)
        else:
            yield pad_batch(batch, size)
