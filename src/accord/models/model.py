"""The multi-tower model: one embedding space for text, image, video and audio, plus learnable temperatures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from accord.data.rows import join_counterfactuals
from accord.modalities import MODALITIES
from accord.models.config import ModelConfig, pair_name
from accord.models.fusion import FusionHead
from accord.models.generative import GenerativeHead
from accord.models.towers import Tower, TowerDict, TowerOutput, backbone_width

# {modality: {input name: tensor}, "present": {modality: bool[B]}}, and optionally the captions' hard negatives
# "text_negatives": {"input_ids": [B, K, L], "attention_mask": [B, K, L], "present": bool [B, K]} and the samples'
# counterfactual pairs "counterfactual": {modality: ..., "present": ...} (B rows; forward makes them rows B..2B-1)
Batch = dict


@dataclass
class ModelOutput:
    embeddings: dict[str, torch.Tensor]  # modality -> [B, D], zero rows where absent
    present: dict[str, torch.Tensor]  # modality -> bool [B]
    logit_scale: dict[str, torch.Tensor]  # pair name -> [1], already exp'd and clamped
    logit_bias: dict[str, torch.Tensor] | None  # pair name -> [1] (sigmoid loss)
    pairs: list[tuple[str, str]]
    tokens: dict[str, torch.Tensor] | None = None  # fusion head's modalities -> [B, L, W] token features
    token_mask: dict[str, torch.Tensor] | None = None  # modality -> bool [B, L]
    token_rows: slice | None = None  # rows of ``embeddings`` the tokens belong to (accumulation); None = all
    negatives: torch.Tensor | None = None  # text embeddings of each caption's hard negatives [B, K, D]
    negative_present: torch.Tensor | None = None  # bool [B, K]
    negative_tokens: torch.Tensor | None = None  # with a fusion head: their token features [B, K, L, W]
    negative_token_mask: torch.Tensor | None = None  # bool [B, K, L]
    # with a generative head: the captions' tokenizer ids [b, T] and real-token mask (False on absent captions) of
    # the rows the tokens belong to; and every row's count of predicted tokens (T - 1 where all are real) [B]
    caption_ids: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None
    caption_targets: torch.Tensor | None = None


class AccordModel(nn.Module):
    """Towers per configured modality; ``forward(batch)`` embeds every modality, running every tower every step.
    With ``cfg.fusion`` it also returns token features and owns the fusion head (run by the matching loss); with
    ``cfg.generative`` the media's token features and the captions' ids, and owns the generative head (run by the
    caption loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = TowerDict()
        for modality in MODALITIES:  # image before video, so that video can share the image backbone
            if modality in cfg.towers:
                tcfg = cfg.towers[modality]
                shared = self.towers["image"].backbone if tcfg.share_image_backbone else None
                self.towers[modality] = Tower(modality, tcfg, cfg.embed_dim, shared_backbone=shared)
        self.pairs = cfg.pair_list()
        names = ["shared"] if cfg.temperature == "shared" else [pair_name(*p) for p in self.pairs]
        # Shape [1], not 0-dim: DeepSpeed cannot partition 0-dim parameters.
        self.logit_scale = nn.ParameterDict(
            {
                n: nn.Parameter(
                    torch.full([1], math.log(1 / cfg.init_temperature)), requires_grad=cfg.learn_temperature
                )
                for n in names
            }
        )
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.ParameterDict(
                {n: nn.Parameter(torch.full([1], float(cfg.init_logit_bias))) for n in names}
            )
        self.fusion = None
        self.token_modalities: set[str] = set()  # whose token features a loss uses (the heads')
        if cfg.fusion is not None:
            fused = {"text"} | {m for _, m in cfg.fusion_pairs()}
            self.token_modalities |= fused
            self.fusion = FusionHead(cfg.fusion, {m: backbone_width(self.towers[m].backbone) for m in sorted(fused)})
        self.generative = None
        if cfg.generative is not None:
            media = sorted(m for _, m in cfg.generative_pairs())
            self.token_modalities |= set(media)
            self.generative = GenerativeHead(
                cfg.generative,
                {m: backbone_width(self.towers[m].backbone) for m in media},
                self.towers["text"].backbone.config.vocab_size,
            )

    def enable_frozen_caches(self) -> dict[str, str | None]:
        """Turn on feature caching for the frozen towers that allow it; ``{modality: None or why not}`` for every
        tower with ``freeze`` set."""
        status: dict[str, str | None] = {}
        for modality, tower in self.towers.items():
            if tower.cfg.freeze:
                status[modality] = tower.enable_cache(tokens=modality in self.token_modalities)
        return status

    def frozen_cache_stats(self) -> dict[str, float]:
        """``{"frozen_cache/<modality>/hit_rate": ..., ".../items": ...}`` since the last call."""
        return {
            f"frozen_cache/{m}/{k}": v
            for m, t in self.towers.items()
            if t.cache is not None
            for k, v in t.cache.stats().items()
        }

    def _param_key(self, pair: tuple[str, str]) -> str:
        return "shared" if self.cfg.temperature == "shared" else pair_name(*pair)

    def temperatures(self) -> dict[str, torch.Tensor]:
        """exp(logit_scale), clamped here in the forward: a clamp after the optimizer step would be undone by
        ZeRO's fp32 master copy."""
        top = math.log(self.cfg.max_logit_scale)
        return {pair_name(*p): self.logit_scale[self._param_key(p)].clamp(0, top).exp() for p in self.pairs}

    def embed(
        self, modality: str, inputs: dict[str, torch.Tensor] | None, present: torch.Tensor | None, batch_size: int
    ) -> tuple[TowerOutput, torch.Tensor]:
        """The tower's output on present rows only (zeros elsewhere) and the presence mask [B].

        With no present row the tower still runs on a dummy input whose output joins the graph with weight 0,
        so that every rank calls every tower (ZeRO-3) and every parameter receives a (zero) gradient. For the
        heads' modalities (fusion, generative), absent rows get zero tokens whose mask keeps only the first one
        (never all-masked, so attention stays finite); other modalities' tokens are the live rows' only (unused).
        """
        with torch.profiler.record_function(f"accord/forward/{modality}"):  # a stage of accord.train.profile
            return self._embed(modality, inputs, present, batch_size)

    def _embed(
        self, modality: str, inputs: dict[str, torch.Tensor] | None, present: torch.Tensor | None, batch_size: int
    ) -> tuple[TowerOutput, torch.Tensor]:
        tower = self.towers[modality]
        ref = next(self.parameters())
        if inputs is None:
            present = torch.zeros(batch_size, dtype=torch.bool, device=ref.device)
        elif present is None:
            present = torch.ones(batch_size, dtype=torch.bool, device=ref.device)
        present = present.to(torch.bool)
        idx = present.nonzero(as_tuple=True)[0]
        if inputs is not None and len(idx) == batch_size:
            return tower(inputs), present
        live = tower(
            {k: v[idx] for k, v in inputs.items()}
            if inputs is not None and len(idx)
            else tower.dummy_inputs(1, ref.device, ref.dtype)
        )
        emb = torch.zeros(batch_size, self.cfg.embed_dim, device=ref.device, dtype=ref.dtype)
        if len(idx) > 0:
            emb = emb.index_copy(0, idx, live.embedding.to(emb.dtype))
        else:  # the dummy joins the graph through what the losses use on ranks that have data (ZeRO-3 traces the
            # modules of forward and backward and needs the same ones on every rank): tokens only with a fusion head
            emb = emb + 0.0 * live.embedding.sum()
        if modality not in self.token_modalities:  # no loss reads them: no per-step copies
            return TowerOutput(emb, live.tokens, live.mask), present
        tokens = live.tokens.new_zeros((batch_size, *live.tokens.shape[1:]))
        mask = torch.zeros(batch_size, live.tokens.shape[1], dtype=torch.bool, device=ref.device)
        mask[:, 0] = True
        if len(idx) > 0:
            return TowerOutput(emb, tokens.index_copy(0, idx, live.tokens), mask.index_copy(0, idx, live.mask)), present
        return TowerOutput(emb + 0.0 * live.tokens.sum(), tokens, mask), present

    def forward(self, batch: Batch) -> ModelOutput:
        batch = join_counterfactuals(batch)  # a sample's counterfactual pair is one more sample of its batch
        present = batch.get("present", {})
        sizes = {len(v) for v in present.values()} | {
            next(iter(batch[m].values())).shape[0] for m in self.towers if m in batch
        }
        if len(sizes) != 1:
            raise ValueError(f"inconsistent batch sizes across modalities: {sorted(sizes)}")
        batch_size = sizes.pop()
        negatives = batch.get("text_negatives") if "text" in self.towers else None
        outputs, masks = {}, {}
        for modality in self.towers:
            if modality == "text" and negatives is not None:
                outputs[modality], masks[modality], neg = self._embed_with_negatives(batch, negatives, batch_size)
                continue
            outputs[modality], masks[modality] = self.embed(
                modality, batch.get(modality), present.get(modality), batch_size
            )
        bias = None
        if self.logit_bias is not None:
            bias = {pair_name(*p): self.logit_bias[self._param_key(p)] for p in self.pairs}
        out = ModelOutput({m: o.embedding for m, o in outputs.items()}, masks, self.temperatures(), bias, self.pairs)
        if negatives is not None:
            out.negatives, out.negative_present = neg.embedding, negatives["present"].to(torch.bool)
        if self.token_modalities:
            out.tokens = {m: outputs[m].tokens for m in self.token_modalities}
            out.token_mask = {m: outputs[m].mask for m in self.token_modalities}
        if self.fusion is not None and negatives is not None:
            out.negative_tokens, out.negative_token_mask = neg.tokens, neg.mask
        if self.generative is not None:
            out.caption_ids, out.caption_mask = captions_of(batch, masks["text"], batch_size)
            out.caption_targets = (out.caption_mask.sum(dim=1) - 1).clamp(min=0)
        return out

    def _embed_with_negatives(
        self, batch: Batch, negatives: dict[str, torch.Tensor], batch_size: int
    ) -> tuple[TowerOutput, torch.Tensor, TowerOutput]:
        """Captions and their negatives in one text-tower call (one call per step on every rank, as ZeRO-3 needs);
        returns the captions' output, their mask, and the negatives' output shaped [B, K, ...]."""
        ids, attn = negatives["input_ids"], negatives["attention_mask"]
        k = ids.shape[1]
        captions = batch.get("text")
        cap_present = batch.get("present", {}).get("text")
        if captions is None:  # no caption in this batch: zero rows, masked out
            captions = {"input_ids": ids.new_zeros(batch_size, 1), "attention_mask": attn.new_zeros(batch_size, 1)}
            cap_present = torch.zeros(batch_size, dtype=torch.bool, device=ids.device)
        elif cap_present is None:
            cap_present = torch.ones(batch_size, dtype=torch.bool, device=ids.device)
        length = max(captions["input_ids"].shape[1], ids.shape[2])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, length - t.shape[-1]))

        inputs = {
            "input_ids": torch.cat([pad(captions["input_ids"]), pad(ids.flatten(0, 1))]),
            "attention_mask": torch.cat([pad(captions["attention_mask"]), pad(attn.flatten(0, 1))]),
        }
        rows_present = torch.cat([cap_present.to(torch.bool), negatives["present"].to(torch.bool).flatten()])
        both, _ = self.embed("text", inputs, rows_present, batch_size * (1 + k))
        cap = TowerOutput(both.embedding[:batch_size], both.tokens[:batch_size], both.mask[:batch_size])
        if "text" not in self.token_modalities:  # tokens of the live rows only: no loss reads them
            neg_tokens, neg_mask = both.tokens[:0], both.mask[:0]
        else:
            neg_tokens = both.tokens[batch_size:].unflatten(0, (batch_size, k))
            neg_mask = both.mask[batch_size:].unflatten(0, (batch_size, k))
        neg = TowerOutput(both.embedding[batch_size:].unflatten(0, (batch_size, k)), neg_tokens, neg_mask)
        return cap, cap_present.to(torch.bool), neg


def captions_of(batch: Batch, present: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's caption ids [B, T] and their real-token mask, False on every token of an absent caption (a batch
    without text: [B, 2] of zeros, all False)."""
    text = batch.get("text")
    if text is None:
        ids = torch.zeros(batch_size, 2, dtype=torch.long, device=present.device)
        return ids, torch.zeros_like(ids, dtype=torch.bool)
    return text["input_ids"], text["attention_mask"].to(torch.bool) & present[:, None]
