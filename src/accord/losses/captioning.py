"""Caption loss of the generative head (CoCa): next-token cross-entropy of each caption given its medium.

For every text pair (text, m), every token a caption predicts (each real token after the first) of every sample
that has both is one term; the loss is their sum divided by ``N_tok``, the *global* count of such tokens: over
all ranks and, with ``accum_steps``, all micro-batches of the step. That is the loss of one process holding the
global batch. Each rank's share is ``L_r = W * (its tokens' summed cross-entropy) / N_tok``: the mean of ``L_r``
over ranks is the global loss, so the data-parallel averaging of parameter gradients is exact, as for the
contrastive loss (no features cross ranks: a caption's likelihood depends on its own sample only). With
accumulation each micro-batch's pass adds its own tokens' share (``ModelOutput.token_rows``), and the passes sum
to the step's loss. ``null_weight`` adds the same terms decoded from the head's null medium (the caption prior).

open_clip's ``CoCaLoss`` takes the mean over one rank's non-pad tokens; on one process the two are equal.
Every rank runs the head for every pair in every step, whatever its data (ZeRO-3).
"""

from __future__ import annotations

import torch

from accord import collectives
from accord.losses.contrastive import world
from accord.models.config import pair_name
from accord.models.generative import GenerativeHead
from accord.models.model import ModelOutput


class CaptionLoss(torch.nn.Module):
    """Sum over the head's pairs of the caption loss (+ ``null_weight`` x the null-medium one); returns (total,
    {"caption/<pair>": this rank's share, "caption_null/<pair>": ...}) for pairs with a token in the global batch."""

    def __init__(self, null_weight: float = 0.0):
        super().__init__()
        self.null_weight = null_weight

    def forward(
        self, out: ModelOutput, head: GenerativeHead, pairs: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.caption_ids is None or out.caption_mask is None or out.caption_targets is None or out.tokens is None:
            raise ValueError(
                "the caption loss needs captions and token features: build the model with model.generative"
            )
        assert out.token_mask is not None
        rows = out.token_rows or slice(0, None)
        _, size = world()
        total: torch.Tensor | float = 0.0
        parts: dict[str, torch.Tensor] = {}
        for a, b in pairs:
            valid_all = out.present[a] & out.present[b]  # every micro-batch's rows
            n_tok = (out.caption_targets * valid_all).sum().to(torch.float64)
            if size > 1:
                n_tok = collectives.all_reduce(n_tok)
            valid = valid_all[rows]
            mask = out.caption_mask & valid[:, None]
            terms: list[tuple[str, float, torch.Tensor | None, torch.Tensor | None]] = [
                (f"caption/{pair_name(a, b)}", 1.0, out.tokens[b], out.token_mask[b])
            ]
            if self.null_weight:
                terms.append((f"caption_null/{pair_name(a, b)}", self.null_weight, None, None))
            for name, weight, memory, memory_mask in terms:
                logp = head.token_log_probs(out.caption_ids, mask, memory, memory_mask, b)
                if n_tok == 0:
                    total = total + 0.0 * logp.sum()
                    continue
                loss = -size * logp.sum() / n_tok.to(logp.dtype)
                parts[name] = loss.detach()
                total = total + weight * loss
        assert isinstance(total, torch.Tensor), "the generative head captions at least one pair"
        return total, parts
