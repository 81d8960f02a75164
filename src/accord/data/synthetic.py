"""Synthetic batches (``data.synthetic``): random inputs of the configured shapes, made on the training device, with
the loader's interface, so that a run measures the step alone (no reading, no decoding, no host-to-device copy)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from accord.data.config import DataConfig
from accord.data.transforms import INPUT_NAMES, medium_shape


class SyntheticBatches:
    """Endless batches of ``cfg.batch_size`` samples in which every modality is present: media of
    :func:`medium_shape` (standard normal), captions of ``cfg.text.max_length`` token ids in
    ``[1, vocab_size)`` with full attention masks, and ``negatives`` one-edit caption negatives per sample when the
    loss uses them. Fresh values every batch (a frozen tower's cache would otherwise hit); the trainer's loader
    interface (epoch, state_dict, skip_stats) with nothing to resume but the batch count."""

    def __init__(
        self,
        cfg: DataConfig,
        modalities: tuple[str, ...],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        vocab_size: int | None = None,
        negatives: int = 0,
        rank: int = 0,
    ):
        if "text" in modalities and not vocab_size:
            raise ValueError("data.synthetic: captions need the text tower's vocabulary size")
        self.cfg, self.modalities, self.device, self.dtype = cfg, modalities, device, dtype
        self.vocab_size, self.negatives, self.rank = vocab_size or 0, negatives, rank
        self.batches = 0
        self.epoch = 0

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            self.cfg.seed * 1_000_003 + self.rank * 7919 + self.batches
        )

    def batch(self) -> dict[str, Any]:
        """The next batch (every call a new one)."""
        n, length = self.cfg.batch_size, self.cfg.text.max_length
        g = self._generator()
        self.batches += 1
        out: dict[str, Any] = {
            "present": {m: torch.ones(n, dtype=torch.bool, device=self.device) for m in self.modalities},
            "__key__": [f"{self.rank}-{self.batches}-{i}" for i in range(n)],
            "__shard__": ["synthetic"] * n,
        }
        for m in self.modalities:
            if m == "text":
                ids = torch.randint(1, self.vocab_size, (n, length), generator=g, device=self.device)
                out["text"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            else:
                shape = (n, *medium_shape(self.cfg, m))
                media = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
                out[m] = {INPUT_NAMES[m]: media}
        if self.negatives and "text" in self.modalities:
            k = self.negatives
            ids = torch.randint(1, self.vocab_size, (n, k, length), generator=g, device=self.device)
            out["text_negatives"] = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "present": torch.ones(n, k, dtype=torch.bool, device=self.device),
            }
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch()

    def state_dict(self) -> dict[str, Any]:
        return {"synthetic_batches": self.batches}

    def load_state_dict(self, states: dict[str, Any] | list[dict[str, Any]]) -> None:
        state = states[self.rank % len(states)] if isinstance(states, list) else states  # elastic: any rank's
        self.batches = int(state.get("synthetic_batches", 0))

    def skip_stats(self) -> dict[str, int]:
        return {}
