"""Rows of a batch: how many, absent rows added, and a batch's counterfactual pairs made rows of it.

Imports nothing of accord but the media table, so that the model (which joins the pairs in its forward) and the
loader's lock-step batches (:mod:`accord.data.batches`) share it without the model depending on the loader.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from accord.modalities import COUNTERFACTUAL


def rows(batch: dict[str, Any]) -> int:
    """The batch's row count (its samples, absent ones included)."""
    return len(next(iter(batch["present"].values())))


def pad_rows(value: dict[str, Any], extra: int) -> dict[str, Any]:
    """Zero rows after every tensor of a (nested) dict: False in masks, absent samples."""
    return {
        k: pad_rows(t, extra) if isinstance(t, dict) else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])
        for k, t in value.items()
    }


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
        out["text_negatives"] = pad_rows(batch["text_negatives"], n)
    if "labels" in batch:
        out["labels"] = batch["labels"] + [None] * n
    return out
