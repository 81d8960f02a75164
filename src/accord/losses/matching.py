"""Matching loss of the fusion head: positives and hard negatives mined from the gathered global batch.

For every text pair (text, m) and every local sample i that has both:

- the positive row (text_i, m_i), label 1;
- a hard negative medium (text_i, m_j), j drawn from the global batch with probability proportional to
  ``exp(cos(text_i, m_j) / T)``, label 0 (T = ``loss.match_temperature``; null takes the pair's learned
  contrastive temperature, as ALBEF: the contrastive model's own retrieval probabilities);
- a hard negative text (text_k, m_i), k drawn likewise from ``exp(s * cos(text_k, m_i))``, label 0.

Candidates are the globally valid samples other than i itself and other than exact duplicates of sample i (same
caption or same medium: cosine 1 within 1e-5), which are not negatives. Token features are all-gathered with
gradient, so a negative taken from another rank trains that rank's towers too. As in the contrastive loss, each
rank's loss is scaled so that the mean over ranks is the binary cross-entropy over all rows of the global batch.
Every rank runs the fusion head once for every pair in every step, whatever its data (ZeRO-3).

With ``loss.hard_negatives`` (``constructed=True``) each caption's one-edit negatives add rows (negative_ik, m_i),
label 0: the caption made false on the sample's own medium, the negatives a mined text can hardly be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accord import collectives
from accord.losses.contrastive import gather_nograd, gather_with_grad, world
from accord.models.config import pair_name
from accord.models.model import ModelOutput

DUPLICATE_COS = 1 - 1e-5


def sample_negatives(
    logits: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, one column drawn with probability ``softmax(logits[row])`` over its ``allowed`` columns;
    -1 for a row without any allowed column. ``logits`` [n, N], ``allowed`` bool [n, N]."""
    idx = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    has = allowed.any(dim=1)
    if has.any():
        masked = logits[has].float().masked_fill(~allowed[has], float("-inf"))
        probs = masked.softmax(dim=-1)
        idx[has] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return idx


class MatchingLoss(torch.nn.Module):
    """Binary cross-entropy of the fusion head over positives and mined negatives, summed over its pairs.
    ``temperature``: of the sampling softmax; None uses the pair's learned contrastive temperature (as ALBEF).
    ``hard=False`` draws negatives uniformly instead (the ablation); ``constructed`` adds the batch's caption
    negatives (``ModelOutput.negative_tokens``) as non-matching rows."""

    def __init__(self, hard: bool = True, temperature: float | None = None, constructed: bool = False):
        super().__init__()
        self.hard, self.temperature, self.constructed = hard, temperature, constructed

    def forward(
        self, out: ModelOutput, fusion: torch.nn.Module, pairs: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.tokens is None or out.token_mask is None:
            raise ValueError("the matching loss needs token features: build the model with model.fusion set")
        rows = out.token_rows or slice(0, None)
        # with accumulation the tokens cover one micro-batch: the step's loss is the mean over micro-batches
        first = next(iter(out.tokens.values()))
        share = first.shape[0] / next(iter(out.embeddings.values())).shape[0]
        total: torch.Tensor | float = 0.0
        parts = {}
        for a, b in pairs:
            scale = (
                out.logit_scale[pair_name(a, b)].detach().float()
                if self.temperature is None
                else torch.tensor(1.0 / self.temperature)
            )
            loss, n_rows = self.pair_loss(
                fusion,
                b,
                out.tokens[a],
                out.token_mask[a],
                out.tokens[b],
                out.token_mask[b],
                out.embeddings[a][rows].detach(),
                out.embeddings[b][rows].detach(),
                out.present[a][rows] & out.present[b][rows],
                scale,
                self._constructed(out, rows) if a == "text" else None,
            )
            if n_rows:
                parts[f"match/{pair_name(a, b)}"] = loss.detach()
            total = total + share * loss
        assert isinstance(total, torch.Tensor), "the fusion head scores at least one pair"
        return total, parts

    def _constructed(self, out: ModelOutput, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The live rows' caption negatives: tokens [n, K, L, W], token mask [n, K, L], present [n, K]."""
        if not self.constructed or out.negative_tokens is None or out.negative_token_mask is None:
            return None
        assert out.negative_present is not None
        return out.negative_tokens, out.negative_token_mask, out.negative_present[rows]

    def pair_loss(
        self,
        fusion: torch.nn.Module,
        modality: str,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        other: torch.Tensor,
        other_mask: torch.Tensor,
        text_emb: torch.Tensor,
        other_emb: torch.Tensor,
        valid: torch.Tensor,
        scale: torch.Tensor,
        constructed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Loss of one pair on this rank's n rows and the global number of scored rows; ``constructed``: the
        captions' negatives (tokens [n, K, L, W], mask [n, K, L], present [n, K]) as extra non-matching rows."""
        rank, size = world()
        n = text.shape[0]
        length = collectives.global_max(text.shape[1])  # text lengths differ across ranks (dynamic padding)
        if text.shape[1] < length:
            text = F.pad(text, (0, 0, 0, length - text.shape[1]))
            text_mask = F.pad(text_mask, (0, length - text_mask.shape[1]))
        all_text, all_other = gather_with_grad(text), gather_with_grad(other)
        all_text_mask, all_other_mask = gather_nograd(text_mask), gather_nograd(other_mask)
        te, oe = text_emb.float(), other_emb.float()
        all_te, all_oe, all_valid = gather_nograd(te), gather_nograd(oe), gather_nograd(valid)

        mine = torch.arange(n, device=text.device) + rank * n  # this rank's rows in the global batch
        same = ((te @ all_te.T) > DUPLICATE_COS) | ((oe @ all_oe.T) > DUPLICATE_COS)
        same[torch.arange(n, device=text.device), mine] = True  # never the positive itself
        allowed = all_valid[None, :] & ~same & valid[:, None]
        sims = scale * (te @ all_oe.T)  # text_i vs medium_j
        sims_t = scale * (oe @ all_te.T)  # medium_i vs text_k
        if not self.hard:
            sims, sims_t = torch.zeros_like(sims), torch.zeros_like(sims_t)
        neg_other = sample_negatives(sims, allowed)
        neg_text = sample_negatives(sims_t, allowed)

        t_rows = torch.cat([text, text, all_text[neg_text.clamp(min=0)]])
        t_mask = torch.cat([text_mask, text_mask, all_text_mask[neg_text.clamp(min=0)]])
        o_rows = torch.cat([other, all_other[neg_other.clamp(min=0)], other])
        o_mask = torch.cat([other_mask, all_other_mask[neg_other.clamp(min=0)], other_mask])
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(text.device)
        weight = torch.cat([valid, valid & (neg_other >= 0), valid & (neg_text >= 0)]).float()
        if constructed is not None:
            c_tokens, c_mask, c_present = constructed
            k = c_tokens.shape[1]
            width = max(t_rows.shape[1], c_tokens.shape[2])
            t_rows = torch.cat(
                [
                    F.pad(t_rows, (0, 0, 0, width - t_rows.shape[1])),
                    F.pad(c_tokens.flatten(0, 1), (0, 0, 0, width - c_tokens.shape[2])),
                ]
            )
            t_mask = torch.cat(
                [F.pad(t_mask, (0, width - t_mask.shape[1])), F.pad(c_mask.flatten(0, 1), (0, width - c_mask.shape[2]))]
            )
            o_rows = torch.cat([o_rows, other.repeat_interleave(k, dim=0)])
            o_mask = torch.cat([o_mask, other_mask.repeat_interleave(k, dim=0)])
            labels = torch.cat([labels, labels.new_zeros(n * k)])
            weight = torch.cat([weight, (c_present & valid[:, None]).flatten().float()])

        logits = fusion(t_rows, t_mask, o_rows, o_mask, modality).float()
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight
        n_rows = weight.sum()
        if size > 1:
            n_rows = collectives.all_reduce(n_rows)
        if n_rows == 0:
            return 0.0 * logits.sum(), 0
        return size * bce.sum() / n_rows, int(n_rows)
