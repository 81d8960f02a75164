"""Contrastive losses over all ranks: symmetric InfoNCE (CLIP) and sigmoid (SigLIP), with presence masks.

Exactness at any world size W. Features are all-gathered *with* gradient: the backward of the gather sums the
gradient that every rank computed for a rank's rows (all-reduce) and hands that rank its slice. Each rank's loss
``L_r`` is scaled so that ``sum_r L_r = W * L`` where ``L`` is the loss of one process holding the global batch.
Then every rank's gradient of its own features is ``W * dL/df``, and the usual data-parallel averaging of parameter
gradients (DDP, DeepSpeed) gives exactly ``dL/dθ`` - for towers and temperatures alike.

Two ways to compute the logits:

- ``gather="global"``: each rank forms the full N x N logits and ``L_r = L`` (memory O(N^2)).
- ``gather="local"``: each rank forms its n local rows against all N columns (memory O(n x N));
  ``L_r = W * (sum of its rows' losses) / N_valid``. The all-reduce mean of ``L_r`` over ranks is ``L``.

Masks: a pair (a, b) only uses samples that have both; other rows and columns are dropped from the softmax and the
mean. ``N_valid`` is the global count of such samples.

Hard negatives (NegCLIP, ``loss.hard_negatives``): each caption's K one-edit negatives are embedded by the text tower
and appended as N x K extra *columns* of the medium->text logits (every medium row sees every sample's negatives);
text->medium keeps the real captions only. They are gathered with gradient like the captions, so the argument above
holds unchanged: a negative is one more column of the same global matrix, and its gradient reaches the rank that
embedded it. A negative column counts only where its sample is valid for the pair and the negative exists; label
smoothing never puts target mass on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from accord import collectives
from accord.config import ConfigError
from accord.data.negatives import CATEGORIES
from accord.models.config import pair_name
from accord.models.model import ModelOutput


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gradient and returns this rank's slice (works on gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(collectives.all_gather(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(grad, "sum")[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order) keeping the gradient path; identity on one process."""
    _, size = world()
    if size == 1:
        return x
    sizes = collectives.all_gather(torch.tensor([x.shape[0]]))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"local batch sizes differ across ranks ({[int(s) for s in sizes]}); "
            "use drop_last so that every rank has the same micro-batch size"
        )
    if torch.is_grad_enabled() and not x.requires_grad:
        # the backward all-reduces, so every rank must run it: also one whose rows are constants (absent samples)
        x = x.detach().requires_grad_()
    return _GatherWithGrad.apply(x)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return x
    return torch.cat(collectives.all_gather(x))


def _softmax_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    col_valid: torch.Tensor,
    smoothing: float,
    smooth_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy over the valid columns only, with optional label smoothing over ``smooth_cols`` (default
    the valid columns; never a hard negative, which is known to be false)."""
    logp = logits.masked_fill(~col_valid[None, :], float("-inf")).log_softmax(dim=-1)
    nll = -logp.gather(1, labels[:, None])[:, 0]
    if smoothing > 0:
        cols = col_valid if smooth_cols is None else smooth_cols
        uniform = -logp.masked_fill(~cols[None, :], 0.0).sum(dim=-1) / cols.sum()
        nll = (1 - smoothing) * nll + smoothing * uniform
    return nll


def _sigmoid_terms(logits: torch.Tensor, labels: torch.Tensor, col_valid: torch.Tensor) -> torch.Tensor:
    """Per-row sum over valid columns of -log sigmoid(z * logit), z = +1 on the positive, -1 elsewhere."""
    z = -torch.ones_like(logits)
    z[torch.arange(len(labels), device=logits.device), labels] = 1.0
    return -(F.logsigmoid(z * logits) * col_valid[None, :].to(logits.dtype)).sum(dim=-1)


@dataclass
class HardNegativesConfig:
    """Typed one-edit negatives of each caption as extra text columns (NegCLIP), from ``accord.data.negatives``."""

    per_caption: int = 1
    """Negatives per caption, each of another category (fewer where a caption allows fewer)."""
    types: list[str] = field(default_factory=lambda: list(CATEGORIES))
    """Categories to draw from (``accord.data.negatives.CATEGORIES``); train on some to test on the others."""
    weight: float = 1.0
    """Each negative counts ``weight`` times: exp(logit) x weight in the softmax denominator (1: NegCLIP), the
    sigmoid loss's term of a negative x weight."""
    seen_only: bool = False
    """Only negatives whose every object, relation and typed-word combination occurs in some caption of the
    vocabulary's source: an edit that forms a combination never seen in training would teach that it is false."""
    match: bool = True
    """With a fusion head: its matching loss also scores (caption negative, medium) as a non-match, beside the
    mined negatives."""
    vocabulary: str | None = None
    """Where the words of each class come from: a shard folder or a text file of captions (one per line); default
    ``data.train`` (then a folder)."""
    vocabulary_captions: int = 10_000
    """Captions read to build the vocabulary (the first ones; every rank reads those samples of the source once at
    start, media bytes included)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if self.per_caption < 1:
            raise ConfigError(f"{dot}per_caption: must be >= 1")
        unknown = sorted(set(self.types) - set(CATEGORIES))
        if unknown or not self.types:
            raise ConfigError(
                f"{dot}types: {'unknown category ' + repr(unknown[0]) if unknown else 'empty'} "
                f"(categories: {', '.join(CATEGORIES)})"
            )
        if self.weight <= 0:
            raise ConfigError(f"{dot}weight: must be > 0")
        if self.vocabulary_captions < 1:
            raise ConfigError(f"{dot}vocabulary_captions: must be >= 1")


@dataclass
class LossConfig:
    """The contrastive loss over every trained pair, and the fusion head's matching loss."""

    kind: Literal["infonce", "siglip"] = "infonce"
    """Symmetric softmax cross-entropy (CLIP) or pairwise sigmoid (SigLIP)."""
    gather: Literal["global", "local"] = "local"
    """Logits per rank: its n rows against all N columns (local, O(n N) memory) or all N x N (global); both exact."""
    label_smoothing: float = 0.0
    """Label smoothing of the InfoNCE targets."""
    pair_weights: dict[str, float] = field(default_factory=dict)
    """Pair name (``text-image``) -> its weight in the total loss (default 1.0)."""
    contrastive_weight: float = 1.0
    """Weight of the whole contrastive loss beside the other terms (CoCa's ``clip_loss_weight``)."""
    caption_weight: float = 2.0
    """Weight of the generative head's caption loss (with ``model.generative``; CoCa's ``caption_loss_weight``)."""
    match_weight: float = 1.0
    """Weight of the fusion head's matching loss (with ``model.fusion``)."""
    match_negatives: Literal["hard", "random"] = "hard"
    """Negatives of the matching loss: mined by similarity (ALBEF), or uniform (ablation)."""
    match_temperature: float | None = 1.0
    """Sampling temperature of hard negatives, p ~ exp(cos / T); null: the pair's learned temperature (ALBEF's,
    much peakier, which small models trained from scratch do not learn from)."""
    match_temperature_end: float | None = None
    """Anneal the sampling temperature geometrically to this value over the run (easy -> hard negatives)."""
    hard_negatives: HardNegativesConfig | None = None
    """One-edit negatives of each caption as extra medium->text columns (needs a text tower)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{dot}label_smoothing: must be in [0, 1)")
        for key in ("match_weight", "contrastive_weight", "caption_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{dot}{key}: must be >= 0")
        if self.match_temperature is not None and self.match_temperature <= 0:
            raise ConfigError(f"{dot}match_temperature: must be > 0 (or null for the learned temperature)")
        if self.match_temperature_end is not None and (
            self.match_temperature is None or self.match_temperature_end <= 0
        ):
            raise ConfigError(f"{dot}match_temperature_end: must be > 0, with a fixed match_temperature to start from")
        if self.kind == "siglip" and self.label_smoothing:
            raise ConfigError(f"{dot}label_smoothing: only for kind 'infonce'")
        if self.hard_negatives is not None:
            self.hard_negatives.validate(f"{dot}hard_negatives")


class ContrastiveLoss(nn.Module):
    """Sum over trained pairs of ``weight * pair_loss``; returns (total, {pair: detached loss of this rank}) where
    the dict leaves out pairs that have no sample with both modalities in the (global) batch."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def pair_loss(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        valid: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        negatives: torch.Tensor | None = None,
        negative_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Loss of one pair and the global count of samples that have both modalities; ``a``, ``b`` [n, D] local
        features, ``valid`` bool [n]; ``negatives`` [n, K, D] of ``a`` (text) with ``negative_valid`` bool [n, K]."""
        rank, size = world()
        all_a, all_b = gather_with_grad(a), gather_with_grad(b)
        all_valid = gather_nograd(valid)
        n_valid = all_valid.sum()
        if n_valid == 0:  # keep the graph (zero gradients), no NaN
            zero = 0.0 * (a.sum() + b.sum() + scale.sum() + (bias.sum() if bias is not None else 0.0))
            if negatives is not None:  # the gather's backward is a collective: every rank runs it
                zero = zero + 0.0 * gather_with_grad(negatives.flatten(0, 1)).sum()
            return zero, 0
        if self.cfg.gather == "global":
            rows_a, rows_b, row_valid, offset, factor = all_a, all_b, all_valid, 0, 1.0
        else:
            rows_a, rows_b, row_valid, offset, factor = a, b, valid, rank * a.shape[0], float(size)
        labels = torch.arange(rows_a.shape[0], device=a.device) + offset
        logits_ab = scale * rows_a @ all_b.T
        neg_logits = neg_valid = None
        if negatives is not None:
            assert negative_valid is not None
            all_neg = gather_with_grad(negatives.flatten(0, 1))  # [N K, D], sample-major
            neg_valid = gather_nograd((negative_valid & valid[:, None]).flatten())
            neg_logits = scale * rows_b @ all_neg.T  # medium rows vs every negative
        weight = self.cfg.hard_negatives.weight if self.cfg.hard_negatives is not None else 1.0
        if self.cfg.kind == "infonce":
            logits_ba, col_valid, smooth_cols = scale * rows_b @ all_a.T, all_valid, all_valid
            if neg_logits is not None and neg_valid is not None:
                logits_ba = torch.cat([logits_ba, neg_logits + math.log(weight)], dim=1)
                col_valid = torch.cat([all_valid, neg_valid])
                smooth_cols = torch.cat([all_valid, torch.zeros_like(neg_valid)])
            per_row = 0.5 * (
                _softmax_ce(logits_ab, labels, all_valid, self.cfg.label_smoothing)
                + _softmax_ce(logits_ba, labels, col_valid, self.cfg.label_smoothing, smooth_cols)
            )
        else:  # sigmoid: every (i, j) pair once; the a->b direction covers them all
            assert bias is not None  # forward() refuses siglip without a logit bias
            per_row = _sigmoid_terms(logits_ab + bias, labels, all_valid)
            if neg_logits is not None and neg_valid is not None:  # each (medium, negative) pair once, label -1
                per_row = per_row - weight * (
                    F.logsigmoid(-(neg_logits + bias)) * neg_valid[None, :].to(neg_logits.dtype)
                ).sum(dim=-1)
        per_row = torch.where(row_valid, per_row, torch.zeros_like(per_row))
        return factor * per_row.sum() / n_valid.to(per_row.dtype), int(n_valid)

    def negatives_of(self, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The text negatives [n, K, D] and their mask [n, K]; zeros (all masked) for a batch without them, so
        that every rank gathers the same shapes."""
        hn = self.cfg.hard_negatives
        if hn is None or "text" not in out.embeddings:
            return None
        if out.negatives is not None and out.negative_present is not None:
            return out.negatives, out.negative_present
        text = out.embeddings["text"]
        n = text.shape[0]
        return (
            text.new_zeros(n, hn.per_caption, text.shape[1]),
            torch.zeros(n, hn.per_caption, dtype=torch.bool, device=text.device),
        )

    def forward(self, out: ModelOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.kind == "siglip" and out.logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit bias: set model.init_logit_bias (e.g. -10)")
        total: torch.Tensor | float = 0.0
        parts = {}
        for a, b in out.pairs:
            name = pair_name(a, b)
            valid = out.present[a] & out.present[b]
            bias = out.logit_bias[name] if out.logit_bias is not None else None
            negs = self.negatives_of(out) if a == "text" else None
            loss, n_valid = self.pair_loss(
                out.embeddings[a], out.embeddings[b], valid, out.logit_scale[name], bias, *(negs or (None, None))
            )
            if n_valid:  # a global count, so every rank reports the same pairs
                parts[name] = loss.detach()
            total = total + self.cfg.pair_weights.get(name, 1.0) * loss
        assert isinstance(total, torch.Tensor), "a model has at least one trained pair"
        return total, parts
