"""Cross-attention fusion head: does this text match this image / clip / sound? (ALBEF/BLIP image-text matching)

Text tokens (projected to ``dim``) are the queries; each layer runs self-attention over the text, cross-attention
from the text to the other modality's tokens and an MLP. With ``symmetric`` the other modality's tokens also attend
to the text in every layer. One module serves every modality: a per-modality input projection (tower widths
differ) and a learned modality embedding tell them apart; the layers and the match head are shared. With
``text_positions`` a fixed sine-cosine table of token indices is added to the text (the layers are otherwise
blind to word order).
``forward`` returns one match logit per (text, other) row; ``sigmoid(logit)`` is the match probability.
"""

from __future__ import annotations

import torch
from torch import nn

from accord.modalities import MODALITIES
from accord.models.attention import Block, masked_mean
from accord.models.config import FusionConfig
from accord.models.positions import sincos_1d


class _FusionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        args = (cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.self_attn = Block(*args)
        self.cross = Block(*args)
        self.cross_back = Block(*args) if cfg.symmetric else None

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.self_attn(text, text, text_mask)
        new_text = self.cross(text, other, other_mask)
        if self.cross_back is not None:
            other = self.cross_back(other, text, text_mask)
        return new_text, other


class FusionHead(nn.Module):
    """Match logits of (text tokens, other tokens) rows; ``widths`` are the towers' token widths by modality."""

    def __init__(self, cfg: FusionConfig, widths: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.inputs = nn.ModuleDict({m: nn.Linear(w, cfg.dim) for m, w in widths.items()})
        self.modality_embedding = nn.Parameter(torch.randn(len(MODALITIES), cfg.dim) * 0.02)
        self.layers = nn.ModuleList(_FusionLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.norm_other = nn.LayerNorm(cfg.dim)
        self.head = nn.Sequential(nn.Linear(3 * cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 1))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor, modality: str
    ) -> torch.Tensor:
        """``text`` [B, Lt, Wt], ``other`` [B, Lo, Wo] token features with bool masks -> match logits [B]."""
        if modality not in self.inputs or modality == "text":
            raise ValueError(
                f"the fusion head scores text against {', '.join(m for m in self.inputs if m != 'text')}"
                f", not {modality!r}"
            )
        x = self.inputs["text"](text) + self.modality_embedding[MODALITIES.index("text")]
        if self.cfg.text_positions:
            x = x + sincos_1d(torch.arange(x.shape[1], device=x.device), self.cfg.dim).to(x.dtype)
        y = self.inputs[modality](other.to(x.dtype)) + self.modality_embedding[MODALITIES.index(modality)]
        text_mask, other_mask = text_mask.to(torch.bool), other_mask.to(torch.bool)
        for layer in self.layers:
            x, y = layer(x, text_mask, y, other_mask)
        t = masked_mean(self.norm(x), text_mask)
        o = masked_mean(self.norm_other(y), other_mask)
        return self.head(torch.cat([t, o, t * o], dim=-1))[:, 0]
