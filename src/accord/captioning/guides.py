"""Guides a decoder optimises, built from consistency scores: standardised, combined, and guarded by fluency.

Every guide has ``vocab`` and ``score(seqs, media) -> [M]`` (the :class:`Scorer` protocol, which
:class:`~accord.captioning.reward.CaptionConsistency` meets), so decoders, MAGIC and SCST take any of them.

- :class:`Standardised`: a score as a z-value, ``(s - mean) / std`` with the mean and std of the score over
  calibration pairs (:func:`calibrate`: every caption with its own medium and with another item's). Scores of
  different kinds (a cosine, a probability, a log-likelihood) then share a scale, so one beta means the same for all.
- :class:`Ensemble`: the mean or the minimum of several standardised scores. The minimum rewards a caption only as
  much as its worst judge does, so a blind spot of one score cannot be exploited alone.
- :class:`Guarded`: a guide plus ``weight`` x the log-probability that the caption is fluent
  (:class:`~accord.captioning.fluency.FluencyHead`): repeated, dropped or shuffled words cost score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from accord.captioning.fluency import FluencyHead
from accord.captioning.reward import Media
from accord.captioning.vocab import CaptionVocab


class Scorer(Protocol):
    @property
    def vocab(self) -> CaptionVocab:
        """The generator vocabulary the captions are written in."""
        ...

    def score(self, seqs: torch.Tensor, media: Media) -> torch.Tensor:
        """Score [M] of captions ``seqs`` [M, T] (generator indices, EOS-terminated) with ``media`` rows [M]."""
        ...


@dataclass
class Standardised:
    """``(scorer.score - mean) / std``."""

    scorer: Scorer
    mean: float
    std: float

    @property
    def vocab(self) -> CaptionVocab:
        return self.scorer.vocab

    def score(self, seqs: torch.Tensor, media: Media) -> torch.Tensor:
        return (self.scorer.score(seqs, media).float() - self.mean) / self.std


@torch.no_grad()
def calibrate(scorer: Scorer, seqs: torch.Tensor, media: Media, chunk: int = 256) -> Standardised:
    """``scorer`` standardised by its mean and std over calibration pairs: each caption of ``seqs`` [N, T] with its
    own medium (row i of ``media``) and with the next item's (row i + 1, wrapping), so the scale spans matching and
    mismatched captions alike. Use captions and media the guided decoders are not evaluated on."""
    if len(seqs) < 2:
        raise ValueError("calibration needs at least 2 captions with their media")
    other = torch.roll(torch.arange(len(seqs)), -1)
    values = torch.cat(
        [
            scorer.score(seqs[i : i + chunk], media[rows[i : i + chunk]]).float()
            for rows in (torch.arange(len(seqs)), other)
            for i in range(0, len(seqs), chunk)
        ]
    )
    std = float(values.std())
    if not std > 0:
        raise ValueError("calibration: the score is constant over the calibration pairs")
    return Standardised(scorer, float(values.mean()), std)


@dataclass
class Ensemble:
    """The ``reduce`` ("mean" or "min") of several standardised scores."""

    members: list[Standardised]
    reduce: Literal["mean", "min"] = "mean"

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an ensemble needs at least one score")
        if self.reduce not in ("mean", "min"):
            raise ValueError(f"ensemble reduce: {self.reduce!r} is not 'mean' or 'min'")

    @property
    def vocab(self) -> CaptionVocab:
        return self.members[0].vocab

    def score(self, seqs: torch.Tensor, media: Media) -> torch.Tensor:
        z = torch.stack([m.score(seqs, media) for m in self.members])
        return z.mean(0) if self.reduce == "mean" else z.min(0).values


@dataclass
class Guarded:
    """``guide.score + weight * fluency.score``: the guide with a fluency term (the media do not enter it)."""

    guide: Scorer
    fluency: FluencyHead
    weight: float = 1.0

    @property
    def vocab(self) -> CaptionVocab:
        return self.guide.vocab

    def score(self, seqs: torch.Tensor, media: Media) -> torch.Tensor:
        base = self.guide.score(seqs, media).float()
        return base + self.weight * self.fluency.score(seqs).to(base.device)
