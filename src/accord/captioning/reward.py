"""The backbone's consistency score of captions made of generator tokens, hard (ids) or soft (probabilities).

Hard captions go to the text tower as tokenizer ids ([CLS] words [SEP]); soft captions as expected input embeddings
``probs @ word_embeddings[vocab]`` (or straight-through Gumbel-softmax one-hots), so the score is differentiable in
the decoder's output distribution. The score is the cosine with the medium's embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from accord.captioning.vocab import EOS, PAD, CaptionVocab


class CaptionConsistency:
    def __init__(self, backbone: Any, vocab: CaptionVocab):
        self.backbone, self.vocab = backbone, vocab
        tower = backbone.model.towers["text"].backbone
        self.word_embeddings = tower.get_input_embeddings().weight  # [tokenizer vocab, H]

    def _to_tokenizer(self, seqs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator indices [M, T] (words first, then EOS / PAD) -> input_ids/attention_mask with CLS/SEP."""
        ended = (seqs == EOS).cumsum(1) > 0
        words = seqs.masked_fill(ended, PAD)
        lengths = (words != PAD).sum(1)
        m, t = words.shape
        ids = torch.cat([torch.full((m, 1), self.vocab.bos_id), self.vocab.token_ids[words],
                         torch.full((m, 1), self.vocab.pad_id)], dim=1)
        ids[torch.arange(m), lengths + 1] = self.vocab.eos_id
        mask = torch.arange(t + 2)[None] <= (lengths + 1)[:, None]
        width = int(lengths.max()) + 2
        return {"input_ids": ids.masked_fill(~mask, self.vocab.pad_id)[:, :width], "attention_mask": mask.long()[:, :width]}

    def text_embedding(self, seqs: torch.Tensor) -> torch.Tensor:
        inputs = self._to_tokenizer(seqs.cpu())
        return self.backbone.model.towers["text"](
            {k: v.to(self.backbone.device) for k, v in inputs.items()}).embedding

    def score(self, seqs: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """Cosine of hard captions [M, T] (generator indices, no BOS) with media embeddings [M, D]."""
        return (self.text_embedding(seqs) * media).sum(-1)

    def soft_score(self, probs: torch.Tensor, mask: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
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
        return (emb * media).sum(-1)
