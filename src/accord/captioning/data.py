"""Caption training / evaluation data: a frozen backbone's token features of every medium, computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accord.captioning.model import blank_memory
from accord.captioning.reward import MediaFeatures
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

    def features(self) -> MediaFeatures:
        """The media as the consistency scores read them (embedding + token features)."""
        return MediaFeatures(self.media, self.memory, self.mask)

    def image_blind(self) -> CaptionData:
        """The same captions on one blank memory token per item: training data of an image-blind language model
        (see :func:`accord.captioning.model.blank_memory`)."""
        memory, mask = blank_memory(len(self), self.memory.shape[-1], self.memory.device, self.memory.dtype)
        return CaptionData(memory, mask, self.media, self.captions, self.targets)

    @classmethod
    @torch.no_grad()
    def encode(
        cls, backbone: Any, vocab: CaptionVocab, items: list[dict[str, Any]], modality: str, max_len: int
    ) -> CaptionData:
        """``items``: dicts with ``text`` and the ``modality`` (raw bytes / paths, as ``accord score`` reads)."""
        if not items:
            raise ValueError(f"no items with text and {modality}")
        out = backbone.encode_all(modality, [i[modality] for i in items])
        captions = [i["text"].strip() for i in items]
        return cls(out.tokens.float(), out.mask, out.embedding.float(), captions, vocab.encode(captions, max_len))
