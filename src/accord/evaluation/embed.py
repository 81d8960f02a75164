"""Embed every sample a loader yields with a model, on one process or gathered from every rank.

The trainer's periodic evaluation and ``accord eval`` both call :func:`embed_all`; under several ranks every rank
steps in lock-step (ranks that ran out of samples embed empty batches), so ZeRO-3 never waits on one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from accord import collectives
from accord.data.batches import lockstep, to_device
from accord.data.loader import Loader
from accord.models.towers import cat_tokens


@torch.no_grad()
def embed_all(
    model,
    loader: Loader,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    max_samples: int | None = None,
    tokens: dict[str, Any] | None = None,
    labels: list[Any] | None = None,
) -> dict[str, Any]:
    """Embeddings and presence of every sample this rank reads, gathered from all ranks (on CPU). Pass a dict as
    ``tokens`` (one process, model with a fusion head) to receive ``{modality: (tokens, mask)}`` as well, and a
    list as ``labels`` (a loader built with ``label_key``) to receive every row's label (None on padding rows)."""
    modalities = tuple(model.towers)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    present: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    token_chunks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modalities}
    seen = 0
    local_labels: list[Any] = []
    for batch in lockstep(iter(loader), modalities, batch_size):
        local_labels.extend(batch.get("labels", [None] * batch_size))
        out = model(to_device(batch, device, dtype))
        for m in modalities:
            chunks[m].append(out.embeddings[m].float().cpu())
            present[m].append(out.present[m].cpu())
            if tokens is not None and m in out.tokens:
                token_chunks[m].append((out.tokens[m].cpu(), out.token_mask[m].cpu()))
        seen += batch_size
        if max_samples is not None and seen * (dist.get_world_size() if dist.is_initialized() else 1) >= max_samples:
            break  # every rank breaks at the same step: lockstep keeps them aligned
    local = {m: (torch.cat(chunks[m]), torch.cat(present[m])) for m in modalities}
    if tokens is not None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("embed_all(tokens=...) runs in one process")
        tokens.update({m: cat_tokens(parts) for m, parts in token_chunks.items() if parts})
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if labels is not None:
            labels.extend(local_labels)
        return local
    parts: list[Any] = collectives.all_gather_object((local, local_labels) if labels is not None else local)
    if labels is not None:
        labels.extend(label for _, rank_labels in parts for label in rank_labels)
        parts = [p for p, _ in parts]
    return {m: (torch.cat([p[m][0] for p in parts]), torch.cat([p[m][1] for p in parts])) for m in modalities}
