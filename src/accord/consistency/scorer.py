"""The cross-modal consistency score: measurable (a number to report) and differentiable (a loss to train with).

For two modalities a, b of the same sample with embeddings e_a, e_b (L2-normalised), c = cos(e_a, e_b):

- ``cosine``:      c, in [-1, 1]
- ``clipscore``:   w * max(c, 0) per sample, w = 2.5 (Hessel et al. 2021, CLIPScore)
- ``torchmetrics``: 100 * c per sample; the *aggregate over a set* is max(mean, 0) (torchmetrics' CLIPScore clamps
  the mean, not each pair: see :func:`torchmetrics_aggregate`)
- ``refclip``:     harmonic mean of clipscore(candidate text, medium) and max(max_r cos(candidate, r), 0) over the
  reference texts r (RefCLIPScore)

- ``fused``:       sigmoid of the fusion head's match logit (text tokens attending to the other modality's tokens):
  the probability that the pair matches; text pairs only, needs a backbone trained with ``model.fusion``
- ``generative``:  the mean per-token log-likelihood of the caption given the medium, minus alpha times its
  likelihood given the generative head's null medium (the caption prior; VisualGPTScore's debiasing, alpha stored
  with the backbone or passed as ``alpha``): text pairs only, needs ``model.generative``. One medium row scores N
  captions in one batched pass (give ``image=[one]`` with N texts); differentiable in float media inputs

With more than two modalities every pair is scored and ``aggregate`` is their weighted mean (weights per pair name,
default 1). Everything is batched tensor maths, so gradients flow to the inputs and the towers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from accord.consistency.backbone import Backbone, HFClipBackbone, load_backbone
from accord.modalities import MODALITIES

Mode = Literal["clipscore", "torchmetrics", "cosine", "refclip", "fused", "generative"]
MODES: tuple[str, ...] = ("clipscore", "torchmetrics", "cosine", "refclip", "fused", "generative")
CLIPSCORE_W = 2.5


@dataclass
class ScoreResult:
    pairs: dict[str, torch.Tensor]  # "text-image" -> [B]
    aggregate: torch.Tensor  # [B]


def torchmetrics_aggregate(scores: torch.Tensor) -> torch.Tensor:
    """What torchmetrics' CLIPScore reports for a set of per-sample ``100 * cos`` scores."""
    return torch.clamp(scores.mean(), min=0.0)


def _key(item: Any, modality: str) -> str | None:
    """The cache key of one input: a caption by its text (never read as a path, even when a file has that name);
    a medium by its bytes (a path: the file's); None for what is not hashed (tensors, PIL images, unreadable paths:
    embedded every time, and the tower reports the problem)."""
    if modality == "text":
        return "s:" + hashlib.sha256(item.encode()).hexdigest() if isinstance(item, str) else None
    if isinstance(item, (str, Path)):
        try:
            return "f:" + hashlib.sha256(Path(item).read_bytes()).hexdigest()
        except OSError:
            return None
    if isinstance(item, bytes):
        return "b:" + hashlib.sha256(item).hexdigest()
    return None


def _check_finite(emb: dict[str, torch.Tensor], passed: set[str]) -> None:
    """A NaN or inf embedding would give a NaN score that looks like a number in a mean: refuse, naming the rows."""
    for m, e in emb.items():
        bad = (~torch.isfinite(e).all(dim=-1)).nonzero().flatten()
        if len(bad):
            source = "embeddings[" + repr(m) + "]" if m in passed else f"the {m} tower's output"
            raise ValueError(
                f"{source}: rows {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''} are not finite "
                "(NaN or inf); a score of them would be NaN"
            )


def _aggregate(pairs: dict[str, torch.Tensor], weights: dict[str, float] | None) -> ScoreResult:
    w = weights or {}
    total = sum(w.get(k, 1.0) for k in pairs)
    terms = [w.get(k, 1.0) * v for k, v in pairs.items()]
    weighted = terms[0]
    for term in terms[1:]:
        weighted = weighted + term
    return ScoreResult(pairs, weighted / total)


class ConsistencyScorer(nn.Module):
    """Scores agreement between any modalities a backbone has. ``cache=True`` memoises embeddings of raw inputs
    (strings, paths, bytes) by content hash; tensors are never cached (they may need gradients)."""

    def __init__(self, backbone: Backbone | HFClipBackbone, cache: bool = False):
        super().__init__()
        self.backbone: Any = backbone  # any module with embed (and, for "fused", encode / match_logits)
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        cache: bool = False,
        dtype: torch.dtype | None = None,
    ) -> ConsistencyScorer:
        """Load a backbone directory (see :func:`load_backbone`) onto ``device``, towers cast to ``dtype``."""
        return cls(load_backbone(path, device, dtype), cache=cache)

    def embed(self, modality: str, inputs: Any) -> torch.Tensor:
        if self.cache is None or torch.is_tensor(inputs) or isinstance(inputs, dict):
            return self.backbone.embed(modality, inputs)
        keys = [_key(x, modality) for x in inputs]
        todo = [i for i, k in enumerate(keys) if k is None or f"{modality}:{k}" not in self.cache]
        if todo:
            fresh = self.backbone.embed(modality, [inputs[i] for i in todo]).detach()
            for i, e in zip(todo, fresh, strict=True):
                if keys[i] is not None:
                    self.cache[f"{modality}:{keys[i]}"] = e
        fresh_by = dict(zip(todo, fresh, strict=True)) if todo else {}
        return torch.stack(
            [fresh_by[i] if i in fresh_by else self.cache[f"{modality}:{k}"] for i, k in enumerate(keys)]
        )

    def score(
        self,
        text: Any = None,
        image: Any = None,
        video: Any = None,
        audio: Any = None,
        *,
        mode: Mode = "clipscore",
        references: list[list[str]] | None = None,
        weights: dict[str, float] | None = None,
        embeddings: dict[str, torch.Tensor] | None = None,
        alpha: float | None = None,
    ) -> ScoreResult:
        """Per-sample scores of every pair of the given modalities and their weighted aggregate (``alpha``: the
        generative mode's prior weight instead of the backbone's)."""
        given = {"text": text, "image": image, "video": video, "audio": audio}
        if mode in ("fused", "generative"):
            return self._head_score(mode, given, weights, embeddings, alpha)
        emb = {m: self.embed(m, v) for m, v in given.items() if v is not None}
        for m, e in (embeddings or {}).items():
            emb[m] = torch.nn.functional.normalize(e, dim=-1)
        _check_finite(emb, passed=set(embeddings or {}))
        present = [m for m in MODALITIES if m in emb]
        if len(present) < 2:
            raise ValueError(f"need at least two modalities to score, got {present}")
        sizes = {m: emb[m].shape[0] for m in present}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes differ across modalities: {sizes}")
        if mode == "refclip" and (references is None or "text" not in present):
            raise ValueError("mode 'refclip' needs text candidates and references=[[ref, ...], ...]")
        pairs: dict[str, torch.Tensor] = {}
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                cos = (emb[a] * emb[b]).sum(dim=-1)
                pairs[f"{a}-{b}"] = self._pair_score(mode, cos, emb, references, a, b)
        return _aggregate(pairs, weights)

    def _head_score(
        self,
        mode: str,
        given: dict[str, Any],
        weights: dict[str, float] | None,
        embeddings: dict[str, torch.Tensor] | None,
        alpha: float | None,
    ) -> ScoreResult:
        """The fused or generative score of text against every other given modality (a head over token features)."""
        head = {
            "fused": ("has_fusion", "fusion head", "model.fusion"),
            "generative": ("has_generative", "generative head", "model.generative"),
        }[mode]
        if embeddings:
            raise ValueError(f"mode {mode!r} needs token features: pass raw inputs, not embeddings=")
        if not getattr(self.backbone, head[0], False):
            raise ValueError(
                f"mode {mode!r}: the backbone {getattr(self.backbone, 'path', '')} has no {head[1]} "
                f"(train with {head[2]} set)"
            )
        others = [m for m in MODALITIES[1:] if given[m] is not None]
        if given["text"] is None or not others:
            raise ValueError(f"mode {mode!r} scores text against another modality: give text and at least one more")
        pairs = {}
        if mode == "fused":
            text = self.backbone.encode("text", given["text"])
            for m in others:
                other = self.backbone.encode(m, given[m])
                if other.embedding.shape[0] != text.embedding.shape[0]:
                    raise ValueError(
                        f"batch sizes differ: text {text.embedding.shape[0]}, {m} {other.embedding.shape[0]}"
                    )
                pairs[f"text-{m}"] = torch.sigmoid(self.backbone.match_logits(text, other, m).float())
            return _aggregate(pairs, weights)
        a = self.backbone.generative_alpha if alpha is None else alpha
        captions = self.backbone.prepare("text", given["text"])
        for m in others:
            cond = self.backbone.caption_log_likelihood(captions, self.backbone.encode(m, given[m]), m)
            pairs[f"text-{m}"] = cond - a * self.backbone.caption_log_likelihood(captions, None, m) if a else cond
        return _aggregate(pairs, weights)

    def _pair_score(
        self,
        mode: Mode,
        cos: torch.Tensor,
        emb: dict[str, torch.Tensor],
        references: list[list[str]] | None,
        a: str,
        b: str,
    ) -> torch.Tensor:
        if mode == "cosine":
            return cos
        if mode == "torchmetrics":
            return 100.0 * cos
        clip_s = CLIPSCORE_W * cos.clamp(min=0.0)
        if mode == "clipscore":
            return clip_s
        if mode != "refclip":
            raise ValueError(f"unknown mode {mode!r} ({', '.join(MODES)})")
        if "text" not in (a, b):
            return clip_s
        assert references is not None  # checked in score()
        if len(references) != len(cos):
            raise ValueError(f"references: {len(references)} lists for {len(cos)} samples")
        counts = torch.tensor([len(r) for r in references], device=cos.device)
        if (counts == 0).any():
            raise ValueError("references: every sample needs at least one reference")
        ref_emb = self.embed("text", [r for refs in references for r in refs])  # one batched call
        owner = torch.repeat_interleave(torch.arange(len(cos), device=cos.device), counts)
        sims = (ref_emb * emb["text"][owner]).sum(dim=-1)
        best = torch.full_like(cos, float("-inf")).scatter_reduce(0, owner, sims, reduce="amax")
        ref_s = best.clamp(min=0.0)
        return 2 * clip_s * ref_s / (clip_s + ref_s).clamp(min=1e-8)


class ConsistencyLoss(nn.Module):
    """``1 - cosine`` averaged over samples and pairs (weighted): minimise it to make a generator's output agree
    with its conditioning. Takes the same inputs as :meth:`ConsistencyScorer.score`."""

    def __init__(self, scorer: ConsistencyScorer, weights: dict[str, float] | None = None):
        super().__init__()
        self.scorer, self.weights = scorer, weights

    def forward(self, **inputs: Any) -> torch.Tensor:
        result = self.scorer.score(**inputs, mode="cosine", weights=self.weights)
        return (1.0 - result.aggregate).mean()
