"""Caption training / evaluation data: a frozen backbone's token features of every medium, computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accord.captioning.vocab import CaptionVocab


@dataclass
class CaptionData:
    memory: torch.Tensor  # [N, L, W] tower token features
    mask: torch.Tensor  # bool [N, L]
    media: torch.Tensor  # [N, D] tower embeddings (for the consistency score)
    captions: list[str]  # reference caption of every item
    targets: torch.Tensor  # [N, max_len + 2] generator indices: BOS words EOS PAD

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    @torch.no_grad()
    def encode(cls, backbone: Any, vocab: CaptionVocab, items: list[dict[str, Any]], modality: str, max_len: int
               ) -> CaptionData:
        """``items``: dicts with ``text`` and the ``modality`` (raw bytes / paths, as ``accord score`` reads)."""
        if not items:
            raise ValueError(f"no items with text and {modality}")
        out = backbone.encode_all(modality, [i[modality] for i in items])
        captions = [i["text"].strip() for i in items]
        return cls(out.tokens.float(), out.mask, out.embedding.float(), captions, vocab.encode(captions, max_len))
