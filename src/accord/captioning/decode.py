"""Decoding strategies behind one interface: ``generate(captioner, memory, mask, media, cfg, consistency)``.

- ``greedy``: the most likely next token at every step.
- ``beam``: beam search; the final choice by length-normalised log-probability.
- ``sample``: nucleus / top-k sampling with a temperature (seeded).
- ``rerank``: N candidates (beam N-best or N samples), the best by ``logp / length + beta * consistency``.
- ``guided``: beam search whose beams are ranked at every step by ``logp + beta * consistency(prefix + token)``
  over the ``guide_top_k`` most likely continuations of every beam (as MAGIC guides with CLIP); with ``beta = 0`` it
  is plain beam search.

``consistency`` is any :class:`~accord.captioning.guides.Scorer` (e.g. the backbone's cosine of a caption with
the medium's embedding ``media``). Sequences are generator indices without BOS, EOS-terminated, PAD after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from accord.captioning.guides import Scorer
from accord.captioning.model import Decoder
from accord.captioning.reward import Media
from accord.captioning.vocab import BOS, EOS, PAD

Strategy = Literal["greedy", "beam", "sample", "rerank", "guided"]
STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample", "rerank", "guided")


@dataclass
class DecodeConfig:
    """How :func:`generate` decodes."""

    strategy: Strategy = "greedy"
    """greedy, beam search, sampling, N-best reranking by the consistency score, or consistency-guided beam."""
    beam: int = 4
    """Beam width (beam, guided, rerank from beam)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sampling: keep the k most likely tokens; 0: no top-k cut."""
    top_p: float = 0.9
    """Sampling: nucleus probability mass."""
    candidates: int = 8
    """Rerank: N candidates."""
    candidate_source: Literal["beam", "sample"] = "sample"
    """Rerank: where the candidates come from."""
    beta: float = 1.0
    """Rerank / guided: weight of the consistency score beside the log-likelihood."""
    guide_top_k: int = 8
    """Guided: continuations scored per beam and step."""
    max_len: int | None = None
    """Words per caption; default: the captioner's."""
    seed: int = 0
    """Seeds sampling."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.beam < 1 or self.candidates < 1 or self.guide_top_k < 1:
            raise ValueError("beam, candidates and guide_top_k must be >= 1")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError("top_p must be in (0, 1] and temperature > 0")


@dataclass
class Decoded:
    seqs: torch.Tensor  # [B, T] generator indices, EOS then PAD
    logp: torch.Tensor  # [B] summed log-probability under the captioner


def _next_logp(model: Decoder, prefix: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(prefix, memory, mask)[:, -1].float().log_softmax(-1)


def constrain(logp: torch.Tensor, done: torch.Tensor, last: bool) -> torch.Tensor:
    """No BOS; PAD only (for free) after EOS; EOS forced at the length limit."""
    logp = logp.clone()
    logp[:, BOS] = float("-inf")
    logp[:, PAD] = float("-inf")
    if last:
        logp[:, :] = float("-inf")
        logp[:, EOS] = 0.0
    logp[done] = float("-inf")
    logp[done, PAD] = 0.0
    return logp


def _lengths(seqs: torch.Tensor) -> torch.Tensor:
    """Words + EOS."""
    return (seqs != PAD).sum(-1).clamp(min=1)


@torch.no_grad()
def greedy(model: Decoder, memory: torch.Tensor, mask: torch.Tensor, max_len: int) -> Decoded:
    return beam_search(model, memory, mask, 1, max_len, length_norm=False)[0]


@torch.no_grad()
def sample(
    model: Decoder,
    memory: torch.Tensor,
    mask: torch.Tensor,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Decoded:
    """One sampled caption per row; ``logp`` under the unmodified model distribution."""
    n = memory.shape[0]
    seqs = torch.full((n, 1), BOS, dtype=torch.long, device=memory.device)
    total = torch.zeros(n, device=memory.device)
    done = torch.zeros(n, dtype=torch.bool, device=memory.device)
    for t in range(max_len + 1):
        logp = constrain(_next_logp(model, seqs, memory, mask), done, t == max_len)
        logits = logp / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        total = total + logp.gather(1, token)[:, 0].masked_fill(done, 0.0)
        seqs = torch.cat([seqs, token], dim=1)
        done = done | (token[:, 0] == EOS) | (token[:, 0] == PAD)
        if done.all():
            break
    return Decoded(seqs[:, 1:], total)


@torch.no_grad()
def beam_search(
    model: Decoder,
    memory: torch.Tensor,
    mask: torch.Tensor,
    beam: int,
    max_len: int,
    consistency: Scorer | None = None,
    media: Media | None = None,
    beta: float = 0.0,
    guide_top_k: int | None = None,
    length_norm: bool = True,
) -> tuple[Decoded, torch.Tensor, torch.Tensor]:
    """Beam search, optionally guided by the consistency score at every step. Returns the best caption per row,
    and all final beams [B, K, T] with their summed log-probabilities [B, K], best first."""
    b, k = memory.shape[0], beam
    guide = None
    if consistency is not None:
        if media is None:
            raise ValueError("guided beam search needs the media the captions are scored against")
        guide = consistency, media
    c = max(k, guide_top_k or k) if guide else k
    mem, msk = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    med = guide[1].repeat_interleave(k * c, 0) if guide else None
    seqs = torch.full((b * k, 1), BOS, dtype=torch.long, device=memory.device)
    score = torch.zeros(b, k, device=memory.device)
    score[:, 1:] = float("-inf")  # all beams start identical: keep one
    done = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
    for t in range(max_len + 1):
        logp = constrain(_next_logp(model, seqs, mem, msk), done, t == max_len)
        vals, idx = logp.topk(c, dim=-1)  # [B*K, c]
        total = score.view(-1, 1) + vals
        rank = total
        if guide is not None and med is not None:
            cand = torch.cat([seqs[:, 1:].repeat_interleave(c, 0), idx.reshape(-1, 1)], dim=1)
            rank = total + beta * guide[0].score(cand, med).view(b * k, c).to(total.dtype)
        best = rank.view(b, k * c).topk(k, dim=-1).indices  # [B, K]
        parent = (best // c) + torch.arange(b, device=memory.device)[:, None] * k
        token = idx.view(b, k * c).gather(1, best)
        seqs = torch.cat([seqs[parent.reshape(-1)], token.reshape(-1, 1)], dim=1)
        score = total.view(b, k * c).gather(1, best)
        done = done[parent.reshape(-1)] | (token.reshape(-1) == EOS) | (token.reshape(-1) == PAD)
        if done.all():
            break
    words = seqs[:, 1:]
    final = score.view(-1) / _lengths(words) if length_norm else score.view(-1)
    if guide is not None:
        final = final + beta * guide[0].score(words, guide[1].repeat_interleave(k, 0)).to(final.dtype)
    final = final.view(b, k)
    order = final.argsort(dim=-1, descending=True)
    all_words = words.view(b, k, -1).gather(1, order[..., None].expand(-1, -1, words.shape[-1]))
    all_scores = score.gather(1, order)
    return Decoded(all_words[:, 0], all_scores[:, 0]), all_words, all_scores


@torch.no_grad()
def rerank(
    candidates: torch.Tensor, logp: torch.Tensor, media: Media, consistency: Scorer, beta: float
) -> tuple[Decoded, torch.Tensor]:
    """Pick from ``candidates`` [B, N, T] by ``logp / length + beta * consistency``; returns the choice and the
    index of the chosen candidate per row."""
    b, n, t = candidates.shape
    flat = candidates.reshape(b * n, t)
    cons = consistency.score(flat, media.repeat_interleave(n, 0)).view(b, n).to(logp.dtype)
    total = logp / _lengths(candidates) + beta * cons
    choice = total.argmax(-1)
    rows = torch.arange(b, device=candidates.device)
    return Decoded(candidates[rows, choice], logp[rows, choice]), choice


def generate(
    model: Decoder,
    memory: torch.Tensor,
    mask: torch.Tensor,
    cfg: DecodeConfig,
    media: Media | None = None,
    consistency: Scorer | None = None,
) -> Decoded:
    """Captions for a batch of media: ``memory`` [B, L, W] token features (+ bool ``mask``), ``media`` [B, D]
    embeddings for the consistency-based strategies."""
    model.eval()
    max_len = cfg.max_len or model.cfg.max_len
    if cfg.strategy in ("rerank", "guided") and (consistency is None or media is None):
        raise ValueError(f"strategy {cfg.strategy!r} needs a consistency scorer and the media embeddings")
    if cfg.strategy == "greedy":
        return greedy(model, memory, mask, max_len)
    if cfg.strategy == "beam":
        return beam_search(model, memory, mask, cfg.beam, max_len)[0]
    if cfg.strategy == "guided":
        return beam_search(model, memory, mask, cfg.beam, max_len, consistency, media, cfg.beta, cfg.guide_top_k)[0]
    generator = torch.Generator(device=memory.device).manual_seed(cfg.seed)
    if cfg.strategy == "sample":
        return sample(model, memory, mask, max_len, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    n = cfg.candidates
    if cfg.candidate_source == "beam":
        _, cands, logp = beam_search(model, memory, mask, n, max_len)
    else:
        drawn = sample(
            model,
            memory.repeat_interleave(n, 0),
            mask.repeat_interleave(n, 0),
            max_len,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            generator,
        )
        cands, logp = drawn.seqs.view(-1, n, drawn.seqs.shape[-1]), drawn.logp.view(-1, n)
    assert media is not None and consistency is not None  # checked above
    return rerank(cands, logp, media, consistency, cfg.beta)[0]
