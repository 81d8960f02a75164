"""Whether a score that a decoder raises can be trusted: does the truth rise with it?

- :func:`gaming_index`: the standardised gain in the optimised score minus the standardised gain in the referee's
  correctness, both against the same unguided decoding: 0 when the truth rises as much as the score (in units of
  their spread over the unguided captions), large when only the score does.
- :func:`candidate_spearman`: per item, the Spearman rank correlation between a score and the referee's correctness
  over the decoder's own candidates for that item, averaged over the items where both vary: whether the score ranks a
  decoder's captions as the truth does (what reranking and guided decoding rely on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def standardised_gain(base: Sequence[float], variant: Sequence[float]) -> float:
    """``(mean(variant) - mean(base)) / std(base)``, std over the base's items (ddof 1); NaN if it is 0."""
    b, v = np.asarray(base, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    std = float(b.std(ddof=1)) if len(b) > 1 else 0.0
    return float((v.mean() - b.mean()) / std) if std > 0 else float("nan")


def gaming_index(
    score_base: Sequence[float],
    score_variant: Sequence[float],
    truth_base: Sequence[float],
    truth_variant: Sequence[float],
) -> float:
    """Standardised gain of the score minus standardised gain of the truth (per-caption values of the unguided and
    of the guided decoding of the same items)."""
    return standardised_gain(score_base, score_variant) - standardised_gain(truth_base, truth_variant)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of mean ranks); NaN when either side is constant."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def candidate_spearman(scores: np.ndarray, correct: np.ndarray) -> tuple[float, int]:
    """Mean over items (rows of ``scores`` / ``correct``, [N, K]: K candidates each) of the within-item Spearman rho,
    over the items where neither is constant; with their count (NaN, 0 when there is none)."""
    rhos = [r for s, c in zip(scores, correct, strict=True) if not np.isnan(r := spearman(s, c))]
    return (float(np.mean(rhos)), len(rhos)) if rhos else (float("nan"), 0)
