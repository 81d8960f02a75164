"""The generative head: a caption decoder cross-attending to a medium tower's token features (CoCa's multimodal
text decoder, trained with the towers).

Its inputs are the caption's tokenizer ids as the text tower reads them (``input_ids`` with the tokenizer's start
token first); position t predicts token t + 1. Each layer runs causal self-attention over the caption, then
cross-attention to the medium's tokens (projected to ``dim`` per modality, plus a learned modality embedding), each
with its MLP. ``null`` memory is one learned token per modality: decoding from it, the head is a language model of
the captions (the prior the generative score divides out). The output layer runs on the rows whose target is real
only, so padding costs no vocabulary-sized logits.
"""

from __future__ import annotations

import torch
from torch import nn

from accord.modalities import MODALITIES
from accord.models.attention import Block
from accord.models.config import GenerativeConfig


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: GenerativeConfig):
        super().__init__()
        args = (cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.self_attn = Block(*args)
        self.cross = Block(*args)

    def forward(
        self, x: torch.Tensor, x_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.cross(self.self_attn(x, x, x_mask, causal=True), memory, memory_mask)


class _Inputs(nn.Module):
    """The decoder's inputs: caption token + position embeddings, and the memory (the medium's tokens projected, or
    the null token) tagged with its modality. A module of its own, so that ZeRO-3 gathers these parameters in its
    forward (the head is also run through methods other than its forward)."""

    def __init__(self, cfg: GenerativeConfig, widths: dict[str, int], vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_length, cfg.dim) * 0.02)
        self.inputs = nn.ModuleDict({m: nn.Linear(w, cfg.dim) for m, w in widths.items()})
        self.modalities = tuple(widths)
        # one null token per modality, row i for modalities[i] (a plain parameter: ZeRO-3 gathers a module's own
        # parameters in its forward, not those of a ParameterDict inside it)
        self.null = nn.Parameter(torch.randn(len(widths), cfg.dim) * 0.02)
        self.modality_embedding = nn.Parameter(torch.randn(len(MODALITIES), cfg.dim) * 0.02)

    def forward(
        self, ids: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None, modality: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption states [B, T, dim], memory [B, L, dim] and its mask; ``memory=None``: the null token. Every
        parameter takes part whatever the memory (ZeRO-3 traces the same modules on every rank): the null token
        and the input projection enter with weight 0 when not used."""
        if modality not in self.inputs:
            raise ValueError(f"the generative head decodes from {', '.join(self.inputs)}, not {modality!r}")
        n, t = ids.shape
        x = self.embed(ids) + self.pos[:, :t]
        tag = self.modality_embedding[MODALITIES.index(modality)]
        null = self.null[self.modalities.index(modality)]
        proj = self.inputs[modality]
        assert isinstance(proj, nn.Linear)
        if memory is None:
            # through the projection's forward: under ZeRO-3 that is where its parameters are gathered
            unused = 0.0 * proj(null.new_zeros(1, proj.in_features)).sum()
            mem = (null + tag + unused).expand(n, 1, -1)
            return x, mem, torch.ones(n, 1, dtype=torch.bool, device=x.device)
        assert memory_mask is not None
        return x, proj(memory.to(proj.weight.dtype)) + tag + 0.0 * null.sum(), memory_mask.to(torch.bool)


class GenerativeHead(nn.Module):
    """Next-token logits of captions given a medium's tokens; ``widths``: the media towers' token widths by
    modality, ``vocab_size``: the text tower's."""

    def __init__(self, cfg: GenerativeConfig, widths: dict[str, int], vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = _Inputs(cfg, widths, vocab_size)
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, vocab_size)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media it decodes from."""
        return self.embed.modalities

    def hidden(
        self,
        ids: torch.Tensor,
        ids_mask: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        modality: str,
    ) -> torch.Tensor:
        """The last layer's normalised states [B, T, dim] of caption inputs ``ids`` [B, T] (bool mask [B, T])."""
        t = ids.shape[1]
        if t > self.cfg.max_length:
            raise ValueError(
                f"captions of {t} tokens, the generative head has {self.cfg.max_length} positions "
                "(model.generative.max_length; data.text.max_length must not exceed it)"
            )
        x, mem, mem_mask = self.embed(ids, memory, memory_mask, modality)
        # the first position is always a key: a row without any real token (an absent caption) stays finite
        keys = ids_mask.to(torch.bool).clone()
        keys[:, 0] = True
        for layer in self.layers:
            x = layer(x, keys, mem, mem_mask)
        return self.norm(x)

    def forward(
        self,
        ids: torch.Tensor,
        ids_mask: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        modality: str,
        targets: bool = False,
    ) -> torch.Tensor:
        """Next-token logits [B, T, V] at every position of ``ids``; ``targets``: :meth:`token_log_probs` instead
        (one entry point, so that every use of the head is a call of its forward, as ZeRO-3 needs)."""
        if not targets:
            return self.out(self.hidden(ids, ids_mask, memory, memory_mask, modality))
        mask = ids_mask.to(torch.bool)
        target = mask[:, 1:]
        h = self.hidden(ids[:, :-1], mask[:, :-1], memory, memory_mask, modality)
        rows = target.nonzero(as_tuple=True)
        logits = self.out(h[rows])  # only where a real token is predicted
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        logp = torch.zeros(target.shape, dtype=logits.dtype, device=ids.device)
        picked = logits.log_softmax(-1).gather(1, ids[:, 1:][rows][:, None])[:, 0]
        if len(picked) == 0:  # keep the output layer in the graph (ZeRO-3: every rank runs every module)
            return logp + 0.0 * logits.sum() + 0.0 * h.sum()
        return logp.index_put(rows, picked)

    def token_log_probs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        modality: str,
    ) -> torch.Tensor:
        """log p(ids[:, t+1] | ids[:, :t+1], medium) [B, T-1] (at least fp32), 0 where the target is padding.
        ``mask`` [B, T] marks real tokens of ``ids`` (the first, the start token, is given, not predicted)."""
        return self(ids, mask, memory, memory_mask, modality, targets=True)
