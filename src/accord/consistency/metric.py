"""The consistency score as a torchmetrics ``Metric``: drops into Lightning and torchmetrics evaluation loops.

    metric = ConsistencyMetric("backbone/", mode="clipscore")
    for batch in loader:
        metric.update(text=batch["captions"], image=batch["images"])
    metric.compute()  # mean over every sample seen, on every rank (states are summed across ranks)

Any pair of the backbone's modalities (``update(text=..., audio=...)``; with more than two, the per-sample
aggregate of :meth:`ConsistencyScorer.score`). ``mode="torchmetrics"`` reports what torchmetrics' CLIPScore does,
``max(mean(100 * cos), 0)``; the other modes report the plain mean of the per-sample scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from accord.consistency.scorer import MODES, ConsistencyScorer, Mode, torchmetrics_aggregate


class ConsistencyMetric(Metric):
    """Mean cross-modal consistency over everything passed to :meth:`update` (across ranks when distributed)."""

    total: torch.Tensor  # states (add_state)
    count: torch.Tensor
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        backbone: str | Path | ConsistencyScorer,
        mode: Mode = "clipscore",
        weights: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        self.scorer = (
            backbone if isinstance(backbone, ConsistencyScorer) else ConsistencyScorer.from_pretrained(backbone)
        )
        self.mode, self.weights = mode, weights
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        text: Any = None,
        image: Any = None,
        video: Any = None,
        audio: Any = None,
        references: list[list[str]] | None = None,
    ) -> None:
        """Score a batch of paired inputs (the raw inputs :meth:`ConsistencyScorer.score` takes)."""
        with torch.no_grad():
            scores = self.scorer.score(
                text=text,
                image=image,
                video=video,
                audio=audio,
                mode=self.mode,
                references=references,
                weights=self.weights,
            ).aggregate
        self.total += scores.double().sum().to(self.total.device)
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        mean = (self.total / self.count).float()
        return torchmetrics_aggregate(mean) if self.mode == "torchmetrics" else mean
