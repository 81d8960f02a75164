"""Zero-shot retrieval on held-out shards: recall@1/5/10 for every trained pair, in both directions, and R@1 after
reranking the cosine top-k by a fusion head's match score."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from accord.data.loader import Loader
from accord.models.config import pair_name
from accord.models.towers import cat_tokens
from accord.train.batches import lockstep, to_device


def recall_at_k(queries: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Query i's match is target i; R@k = share of queries whose match ranks in the top k by cosine.

    Targets within 1e-5 of the match's similarity count as ties in its favour: identical captions embed to the same
    vector up to float noise (which depends on batch padding), and must not make the metric flip."""
    sims = queries.float() @ targets.float().T
    rank = (sims > sims.diagonal()[:, None] + 1e-5).sum(dim=1)  # targets clearly better than the match
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query idx [M], target idx [M]) -> scores [M]


def rerank_topk(sims: torch.Tensor, k: int, score_fn: ScoreFn, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k targets of every query by cosine [Q, k] and their scores under ``score_fn`` [Q, k]."""
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices
    queries = torch.arange(sims.shape[0])[:, None].expand_as(top).reshape(-1)
    flat = top.reshape(-1)
    scores = torch.cat(
        [score_fn(queries[i : i + chunk], flat[i : i + chunk]).float().cpu() for i in range(0, len(flat), chunk)]
    )
    return top, scores.view_as(top)


def recall_at_1_reranked(sims: torch.Tensor, k: int, score_fn: ScoreFn) -> float:
    """R@1 after reordering the cosine top-k by ``score_fn`` (query i's match is target i). Ties as in
    :func:`recall_at_k`: the match counts as first when it is in the top k up to 1e-5 in cosine and its score is
    within 1e-5 of the best reranked score."""
    sims = sims.float()
    top, scores = rerank_topk(sims, k, score_fn)
    diag = sims.diagonal()
    in_top = diag >= sims.gather(1, top[:, -1:])[:, 0] - 1e-5
    own = score_fn(torch.arange(len(diag)), torch.arange(len(diag))).float().cpu()
    return float((in_top & (own >= scores.max(dim=1).values - 1e-5)).float().mean())


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
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (local, local_labels) if labels is not None else local)
    if labels is not None:
        labels.extend(label for _, rank_labels in parts for label in rank_labels)
        parts = [p for p, _ in parts]
    return {m: (torch.cat([p[m][0] for p in parts]), torch.cat([p[m][1] for p in parts])) for m in modalities}


def _pair_scorer(
    match_fn: Callable[..., torch.Tensor],
    tt: torch.Tensor,
    tm: torch.Tensor,
    ot: torch.Tensor,
    om: torch.Tensor,
    modality: str,
) -> ScoreFn:
    """(text idx, other idx) -> fusion logits."""
    return lambda t, o: match_fn(tt[t], tm[t], ot[o], om[o], modality)


def retrieval(
    embeddings: dict[str, Any],
    pairs: list[tuple[str, str]],
    rerank: int = 0,
    match_fn: Callable[..., torch.Tensor] | None = None,
    tokens: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``{"text-image/text->image/R@1": ...}`` on the samples that have both modalities of a pair. With ``rerank``
    = k, a ``match_fn(text_tokens, text_mask, other_tokens, other_mask, modality)`` (the fusion head) and the
    ``tokens`` of :func:`embed_all`, text pairs also get ``.../R@1+rerank{k}``."""
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
        if rerank and match_fn is not None and tokens is not None and a == "text":
            sims = ea[both] @ eb[both].T
            (tt, tm), (ot, om) = tokens[a], tokens[b]
            fused = _pair_scorer(match_fn, tt[both], tm[both], ot[both], om[both], b)
            out[f"{name}/{a}->{b}/R@1+rerank{rerank}"] = recall_at_1_reranked(sims, rerank, fused)
            out[f"{name}/{b}->{a}/R@1+rerank{rerank}"] = recall_at_1_reranked(
                sims.T, rerank, lambda q, t, fused=fused: fused(t, q)
            )
    return out


@torch.no_grad()
def zeroshot_metrics(
    model,
    cfg,
    embeddings: dict[str, Any],
    labels: list[Any],
    decoder,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 64,
) -> dict[str, float]:
    """``{"zeroshot/<modality>/top1": ...}``: the gathered samples of :func:`embed_all` classified against the
    prompt-ensembled class embeddings of the model's text tower (every rank runs the text tower: ZeRO-3)."""
    from collections import Counter

    from accord.consistency.zeroshot import (
        DEFAULT_TEMPLATES,
        class_embeddings,
        classify,
        label_index,
        read_lines,
    )
    from accord.data.transforms import collate

    media = [m for m in model.towers if m != "text"]
    modality = cfg.modality or media[0]
    classes = read_lines(cfg.classes, "eval.zeroshot.classes")
    templates = read_lines(cfg.templates, "eval.zeroshot.templates") if cfg.templates else DEFAULT_TEMPLATES[modality]

    def embed_text(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [
                torch.tensor(decoder.tokenizer(t, truncation=True, max_length=decoder.cfg.text.max_length)["input_ids"])
                for t in texts[i : i + batch_size]
            ]
            batch = collate(
                [{"__key__": str(j), "text": x} for j, x in enumerate(ids)],
                decoder,
                decoder.tokenizer.pad_token_id or 0,
            )
            inputs = to_device(batch, device, dtype)["text"]
            out.append(model.embed("text", inputs, None, len(ids))[0].embedding.float().cpu())
        return torch.cat(out)

    class_emb = class_embeddings(embed_text, classes, templates)
    features, present = embeddings[modality]
    skipped: Counter[str] = Counter()
    rows, targets = [], []
    for row, (has, label) in enumerate(zip(present.tolist(), labels, strict=True)):
        index = label_index(label, classes) if has else None
        if not has:
            continue
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
