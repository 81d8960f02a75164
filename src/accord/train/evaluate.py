"""Zero-shot retrieval on held-out shards: recall@1/5/10 for every trained pair, in both directions."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from accord.data.loader import Loader
from accord.models.config import pair_name
from accord.train.batches import lockstep, to_device


def recall_at_k(queries: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Query i's match is target i; R@k = share of queries whose match ranks in the top k by cosine.

    Targets within 1e-5 of the match's similarity count as ties in its favour: identical captions embed to the same
    vector up to float noise (which depends on batch padding), and must not make the metric flip."""
    sims = queries.float() @ targets.float().T
    rank = (sims > sims.diagonal()[:, None] + 1e-5).sum(dim=1)  # targets clearly better than the match
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def embed_all(model, loader: Loader, device: torch.device, dtype: torch.dtype, batch_size: int,
              max_samples: int | None = None) -> dict[str, Any]:
    """Embeddings and presence of every sample this rank reads, gathered from all ranks (on CPU)."""
    modalities = tuple(model.towers)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    present: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    seen = 0
    for batch in lockstep(iter(loader), modalities, batch_size):
        out = model(to_device(batch, device, dtype))
        for m in modalities:
            chunks[m].append(out.embeddings[m].float().cpu())
            present[m].append(out.present[m].cpu())
        seen += batch_size
        if max_samples is not None and seen * (dist.get_world_size() if dist.is_initialized() else 1) >= max_samples:
            break  # every rank breaks at the same step: lockstep keeps them aligned
    local = {m: (torch.cat(chunks[m]), torch.cat(present[m])) for m in modalities}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {m: (torch.cat([p[m][0] for p in parts]), torch.cat([p[m][1] for p in parts])) for m in modalities}


def retrieval(embeddings: dict[str, Any], pairs: list[tuple[str, str]]) -> dict[str, float]:
    """``{"text-image/text->image/R@1": ...}`` on the samples that have both modalities of a pair."""
    out: dict[str, float] = {}
    for a, b in pairs:
        (ea, pa), (eb, pb) = embeddings[a], embeddings[b]
        both = pa & pb
        if both.sum() < 2:
            continue
        name = pair_name(a, b)
        out[f"{name}/n"] = int(both.sum())
        for q, t, qn, tn in ((ea[both], eb[both], a, b), (eb[both], ea[both], b, a)):
            for k, v in recall_at_k(q, t).items():
                out[f"{name}/{qn}->{tn}/{k}"] = v
    return out
