"""Zero-shot retrieval: recall@1/5/10 for every trained pair, in both directions, and R@1 after reranking the cosine
top-k by a fusion head's match score. Works on the gathered embeddings of :func:`accord.evaluation.embed.embed_all`
(the trainer's periodic evaluation and ``accord eval`` alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from accord.models.config import pair_name


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


def _swapped(score_fn: ScoreFn) -> ScoreFn:
    """(query, target) -> score_fn(target, query): the other retrieval direction of a pair scorer."""
    return lambda q, t: score_fn(t, q)


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
            out[f"{name}/{b}->{a}/R@1+rerank{rerank}"] = recall_at_1_reranked(sims.T, rerank, _swapped(fused))
    return out
