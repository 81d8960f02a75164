"""Caption decoders that cross-attend to a tower's token features (any modality): a small transformer trained here
(:class:`Captioner`), or the backbone's generative head trained with the towers (:class:`HeadCaptioner`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accord.models.towers import backbone_width


@dataclass
class CaptionerConfig:
    """The caption decoder: a small transformer decoder cross-attending to a tower's token features."""

    dim: int = 128
    """Model width."""
    layers: int = 2
    """Decoder layers."""
    heads: int = 4
    """Attention heads."""
    dropout: float = 0.1
    """Dropout while training."""
    max_len: int = 16
    """Words per caption (without BOS / EOS)."""


class Captioner(nn.Module):
    """``forward(tokens [B, T], memory [B, L, W], memory_mask bool [B, L])`` -> next-token logits [B, T, V]."""

    def __init__(self, cfg: CaptionerConfig, vocab_size: int, memory_width: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_len + 2, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.memory_width = memory_width
        self.memory_proj = nn.Sequential(nn.Linear(memory_width, cfg.dim), nn.LayerNorm(cfg.dim))
        layer = nn.TransformerDecoderLayer(
            cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, vocab_size)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(tokens, memory, memory_mask))

    def hidden(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's normalised hidden states [B, T, dim] (what the output layer reads)."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:, :t]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        y = self.decoder(
            x, self.memory_proj(memory), tgt_mask=causal, memory_key_padding_mask=~memory_mask, tgt_is_causal=True
        )
        return self.norm(y)


def blank_memory(
    n: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-zero memory token per row: a Captioner trained and decoded with it is an image-blind language model
    (it sees the captions only), as MAGIC's language model is."""
    return torch.zeros(n, 1, width, device=device, dtype=dtype), torch.ones(n, 1, dtype=torch.bool, device=device)


class HeadCaptioner(nn.Module):
    """The backbone's generative head (``model.generative``, trained jointly with the towers) as a caption decoder
    over a :class:`~accord.captioning.vocab.CaptionVocab`: the same interface as :class:`Captioner` (``forward``,
    ``hidden``, ``cfg.max_len``), so every decoding and training strategy starts from it. Caption indices map to the
    tokenizer ids the head reads; its output layer is restricted to the vocabulary's rows. The head is a copy: fine-
    tuning it here leaves the backbone's own untouched."""

    def __init__(self, backbone: Any, vocab: Any, modality: str, cfg: CaptionerConfig | None = None):
        super().__init__()
        head = backbone.model.generative
        if head is None:
            raise ValueError(f"{backbone.path}: this backbone has no generative head (train with model.generative)")
        if modality not in head.modalities:
            raise ValueError(f"the generative head decodes from {', '.join(head.modalities)}, not {modality!r}")
        self.cfg = cfg or CaptionerConfig()
        if self.cfg.max_len + 2 > head.cfg.max_length:
            raise ValueError(f"max_len {self.cfg.max_len}: the head has {head.cfg.max_length} positions")
        self.head = copy.deepcopy(head).float().requires_grad_(True)  # trainable, whatever the backbone's are
        self.modality = modality
        self.memory_width = backbone_width(backbone.model.towers[modality].backbone)
        self.token_ids: torch.Tensor
        self.register_buffer("token_ids", vocab.token_ids.clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        out = self.head.out
        ids = self.token_ids
        return F.linear(self.hidden(tokens, memory, memory_mask), out.weight[ids], out.bias[ids])

    def hidden(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """The head's last normalised states [B, T, dim] (causal: padding after the end changes nothing before it)."""
        ids = self.token_ids[tokens]
        return self.head.hidden(ids, torch.ones_like(ids, dtype=torch.bool), memory, memory_mask, self.modality)


Decoder = Captioner | HeadCaptioner  # what the decoding and training strategies take
