"""The backbone's consistency score of captions made of generator tokens, hard (ids) or soft (probabilities).

Hard captions go to the text tower as tokenizer ids ([CLS] words [SEP]); soft captions as expected input embeddings
``probs @ word_embeddings[vocab]`` (or straight-through Gumbel-softmax one-hots), so the score is differentiable in
the decoder's output distribution. The score is the cosine with the medium's embedding (``kind="cosine"``) or, for a
backbone with a fusion head, its match probability ``sigmoid(match_logit)`` over the caption's and the medium's token
features (``kind="fused"``; hard captions only), or, for a backbone with a generative head, the caption's mean token
log-likelihood given the medium minus alpha x its prior (``kind="generative"``, the backbone's alpha; hard captions
only). The media are a ``[M, D]`` embedding tensor or :class:`MediaFeatures` (embedding + token features: what the
fused and generative scores need).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from accord.captioning.vocab import EOS, PAD, CaptionVocab
from accord.models.towers import TowerOutput


@dataclass
class MediaFeatures:
    """Rows of media as a tower encodes them: ``embedding`` [N, D], ``tokens`` [N, L, W], bool ``mask`` [N, L].
    Sliced and repeated like a tensor, so decoders pass it wherever they pass an embedding tensor."""

    embedding: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.embedding)

    def __getitem__(self, idx: Any) -> MediaFeatures:
        return MediaFeatures(self.embedding[idx], self.tokens[idx], self.mask[idx])

    def repeat_interleave(self, repeats: int, dim: int = 0) -> MediaFeatures:
        return MediaFeatures(*(t.repeat_interleave(repeats, dim) for t in (self.embedding, self.tokens, self.mask)))


Media = torch.Tensor | MediaFeatures  # what a caption is scored against: embeddings [N, D], or with token features


def _embedding(media: Media) -> torch.Tensor:
    return media.embedding if isinstance(media, MediaFeatures) else media


class CaptionConsistency:
    """``score(captions, media)``: the backbone's consistency of generated captions with media (see the module)."""

    def __init__(
        self,
        backbone: Any,
        vocab: CaptionVocab,
        kind: Literal["cosine", "fused", "generative"] = "cosine",
        modality: str = "image",
        cache_items: int = 50_000,
    ):
        if kind not in ("cosine", "fused", "generative"):
            raise ValueError(f"consistency kind: {kind!r} is not 'cosine', 'fused' or 'generative'")
        if kind == "fused" and not backbone.has_fusion:
            raise ValueError(
                f"{backbone.path}: the fused score needs a backbone with a fusion head (train with model.fusion set)"
            )
        if kind == "generative" and not getattr(backbone, "has_generative", False):
            raise ValueError(
                f"{backbone.path}: the generative score needs a backbone with a generative head (model.generative)"
            )
        self._prior: OrderedDict[bytes, float] = OrderedDict()  # generative: caption ids -> its prior
        self.backbone, self.vocab, self.kind, self.modality = backbone, vocab, kind, modality
        self.cache_items = cache_items
        # caption ids -> (embedding, token features or None): see cached_text
        self._cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        tower = backbone.model.towers["text"].backbone
        self.word_embeddings = tower.get_input_embeddings().weight  # [tokenizer vocab, H]

    def _to_tokenizer(self, seqs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator indices [M, T] (words first, then EOS / PAD) -> input_ids/attention_mask with CLS/SEP."""
        ended = (seqs == EOS).cumsum(1) > 0
        words = seqs.masked_fill(ended, PAD)
        lengths = (words != PAD).sum(1)
        m, t = words.shape
        ids = torch.cat(
            [torch.full((m, 1), self.vocab.bos_id), self.vocab.token_ids[words], torch.full((m, 1), self.vocab.pad_id)],
            dim=1,
        )
        ids[torch.arange(m), lengths + 1] = self.vocab.eos_id
        mask = torch.arange(t + 2)[None] <= (lengths + 1)[:, None]
        width = int(lengths.max()) + 2
        return {
            "input_ids": ids.masked_fill(~mask, self.vocab.pad_id)[:, :width],
            "attention_mask": mask.long()[:, :width],
        }

    def _run_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TowerOutput:
        tower, device = self.backbone.model.towers["text"], self.backbone.device
        return tower({"input_ids": ids.to(device), "attention_mask": mask.to(device)})

    def encode_text(self, seqs: torch.Tensor) -> TowerOutput:
        """The text tower's output for hard captions [M, T] (one forward; with autograd)."""
        inputs = self._to_tokenizer(seqs.cpu())
        return self._run_text(inputs["input_ids"], inputs["attention_mask"])

    def text_embedding(self, seqs: torch.Tensor) -> torch.Tensor:
        """Embeddings [M, D] of hard captions (cached without autograd: see :meth:`cached_text`)."""
        if torch.is_grad_enabled():
            return self.encode_text(seqs).embedding
        return self.cached_text(seqs, tokens=False).embedding

    @torch.no_grad()
    def cached_text(self, seqs: torch.Tensor, tokens: bool) -> TowerOutput:
        """:meth:`encode_text` with each distinct caption encoded once per scorer and reused in later calls (the
        text tower is frozen; decoders score the same prefixes for many media, steps and beams): the embedding, and
        with ``tokens`` its token features (padded to the longest caption of the call, mask False after). At most
        ``cache_items`` captions are kept, least recently used out."""
        inputs = self._to_tokenizer(seqs.cpu())
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = mask.sum(1).tolist()
        keys = [row[:n].numpy().tobytes() + (b"t" if tokens else b"") for row, n in zip(ids, lengths, strict=True)]
        missing = list({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        for start in range(0, len(missing), 256):
            rows = missing[start : start + 256]
            out = self._run_text(ids[rows], mask[rows])
            for j, i in enumerate(rows):
                self._cache[keys[i]] = (
                    out.embedding[j].clone(),
                    out.tokens[j, : lengths[i]].clone() if tokens else None,
                )
        entries = [self._cache[k] for k in keys]
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_items:
            self._cache.popitem(last=False)
        embedding = torch.stack([e for e, _ in entries])
        if not tokens:
            return TowerOutput(embedding, embedding[:, None, :0], torch.ones(len(keys), 0, dtype=torch.bool))
        width = max(lengths)
        token_feats = [t for _, t in entries if t is not None]  # every entry: its key asked for tokens
        feats = embedding.new_zeros(len(keys), width, token_feats[0].shape[-1])
        for i, t in enumerate(token_feats):
            feats[i, : len(t)] = t
        token_mask = (
            torch.arange(width, device=feats.device)[None] < torch.tensor(lengths, device=feats.device)[:, None]
        )
        return TowerOutput(embedding, feats, token_mask)

    def score(self, seqs: torch.Tensor, media: Media) -> torch.Tensor:
        """Consistency [M] of hard captions [M, T] (generator indices, no BOS) with ``media`` rows [M]."""
        if self.kind == "cosine":
            return (self.text_embedding(seqs) * _embedding(media)).sum(-1)
        if not isinstance(media, MediaFeatures):
            raise ValueError(f"the {self.kind} score needs the media's token features: pass MediaFeatures")
        if self.kind == "generative":
            return self._generative(seqs, media)
        text = self.encode_text(seqs) if torch.is_grad_enabled() else self.cached_text(seqs, tokens=True)
        other = TowerOutput(media.embedding, media.tokens.to(text.tokens.dtype), media.mask)
        return torch.sigmoid(self.backbone.match_logits(text, other, self.modality).float())

    def _generative(self, seqs: torch.Tensor, media: MediaFeatures) -> torch.Tensor:
        """The generative head's score of hard captions given the media rows; each caption's prior computed once."""
        inputs = self._to_tokenizer(seqs.cpu())
        medium = TowerOutput(media.embedding, media.tokens, media.mask)
        cond = self.backbone.caption_log_likelihood(inputs, medium, self.modality)
        alpha = self.backbone.generative_alpha
        if not alpha:
            return cond
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        keys = [row[: int(n)].numpy().tobytes() for row, n in zip(ids, mask.sum(1), strict=True)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self._prior})
        if missing:
            rows = {"input_ids": ids[missing], "attention_mask": mask[missing]}
            with torch.no_grad():
                values = self.backbone.caption_log_likelihood(rows, None, self.modality).tolist()
            for i, v in zip(missing, values, strict=True):
                self._prior[keys[i]] = v
        for k in keys:
            self._prior.move_to_end(k)
        while len(self._prior) > self.cache_items:
            self._prior.popitem(last=False)
        return cond - alpha * torch.tensor([self._prior[k] for k in keys], device=cond.device)

    def soft_score(self, probs: torch.Tensor, mask: torch.Tensor, media: Media) -> torch.Tensor:
        """Cosine of soft captions: ``probs`` [M, T, V] over the generator vocabulary at the ``mask``ed positions."""
        table = self.word_embeddings[self.vocab.token_ids.to(self.word_embeddings.device)]  # [V, H]
        words = probs.to(table.dtype) @ table
        m, t = mask.shape
        cls = self.word_embeddings[self.vocab.bos_id].expand(m, 1, -1)
        sep = self.word_embeddings[self.vocab.eos_id]
        lengths = mask.sum(1)
        embeds = torch.cat([cls, words * mask[..., None].to(words.dtype), torch.zeros_like(cls)], dim=1)
        at_end = F.one_hot(lengths + 1, t + 2).to(embeds.dtype)  # SEP right after the last word
        embeds = embeds + at_end[..., None] * sep
        attention = (torch.arange(t + 2, device=mask.device)[None] <= (lengths + 1)[:, None]).long()
        emb = self.backbone.encode("text", {"inputs_embeds": embeds, "attention_mask": attention}).embedding
        return (emb * _embedding(media)).sum(-1)
