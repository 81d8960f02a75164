"""The trainer's periodic evaluation on ``data.val``: zero-shot retrieval per pair and, with ``eval.zeroshot``,
zero-shot classification, computed by :mod:`accord.evaluation` on embeddings gathered from every rank.

``should_eval`` is the policy: every ``eval.every`` steps, and once at the end of the run (unless the last step was
just evaluated). Every rank runs every evaluation (ZeRO-3 gathers parameters in each tower's forward).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import torch

from accord.config import ConfigError, to_dict
from accord.consistency.backbone import Backbone
from accord.data.loader import Loader
from accord.evaluation.compositional import Item, evaluate_items, read_items
from accord.evaluation.embed import embed_all
from accord.evaluation.retrieval import retrieval
from accord.evaluation.zeroshot import DEFAULT_TEMPLATES, embed_prompts, read_lines, zeroshot_metrics
from accord.train.config import TrainConfig


class Validator:
    """Evaluates the engine's model on ``data.val``; ``enabled`` is False when the run has no validation data."""

    def __init__(self, cfg: TrainConfig, modalities: tuple[str, ...], device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.evaluated_at: int | None = None
        self.loader: Loader | None = None
        zeroshot = cfg.eval.zeroshot
        if cfg.data.val:
            label_key = zeroshot.label_key if zeroshot else None
            data = dataclasses.replace(cfg.data, persistent_workers=False)
            self.loader = Loader(data, modalities, train=False, label_key=label_key)
        self.compositional: list[Item] = []  # data.val's samples, read once
        self.train_captions: list[str] = []
        self.skipped: Counter[str] = Counter()
        if cfg.eval.compositional is not None:
            self._read_compositional(cfg)
        self.classes: list[str] = []
        self.templates: list[str] = []
        self.modality: str = next((m for m in modalities if m != "text"), "")
        if zeroshot is not None:
            self.modality = zeroshot.modality or self.modality
            self.classes = read_lines(zeroshot.classes, "eval.zeroshot.classes")
            self.templates = (
                read_lines(zeroshot.templates, "eval.zeroshot.templates")
                if zeroshot.templates
                else DEFAULT_TEMPLATES[self.modality]
            )

    def _read_compositional(self, cfg: TrainConfig) -> None:
        comp = cfg.eval.compositional
        assert comp is not None and cfg.data.val is not None and cfg.data.train is not None
        for key, spec in (("data.val", cfg.data.val), ("data.train", cfg.data.train)):
            fs, path = fsspec.core.url_to_fs(spec)
            if "::" in spec or spec.startswith("pipe:") or not fs.isdir(path):
                raise ConfigError(f"eval.compositional: {key} must be a folder of shards, not {spec!r}")
        self.compositional = read_items(cfg.data.val, self.skipped, comp.max_samples)
        if not self.compositional:
            raise ConfigError(f"eval.compositional: no sample of {cfg.data.val} has a caption and one medium")
        self.train_captions = [i.caption for i in read_items(cfg.data.train, Counter(), comp.train_captions)]

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    def should_eval(self, step: int, last: bool = False) -> bool:
        """Periodically (``last=False``: every ``eval.every`` steps) or at the end of the run (``last=True``)."""
        if not self.enabled:
            return False
        if last:
            return self.evaluated_at != step
        return bool(self.cfg.eval.every) and step % self.cfg.eval.every == 0

    @torch.no_grad()
    def evaluate(self, engine: Any, step: int) -> dict[str, float]:
        """Metrics of the model at ``step`` (the engine is back in training mode afterwards)."""
        assert self.loader is not None, "no data.val"
        engine.eval()
        labels: list[Any] | None = [] if self.classes else None
        batch_size, max_samples = self.cfg.data.batch_size, self.cfg.eval.max_samples
        emb = embed_all(engine, self.loader, self.device, self.dtype, batch_size, max_samples, labels=labels)
        metrics = retrieval(emb, engine.module.pairs)
        if labels is not None:
            decoder = self.loader.decoder

            def embed_text(texts: list[str]) -> torch.Tensor:
                return embed_prompts(engine.module, decoder, texts, self.device, self.dtype)

            metrics.update(zeroshot_metrics(emb, labels, self.modality, self.classes, self.templates, embed_text))
        if self.compositional:
            metrics.update(self._compositional(engine.module))
        engine.train()
        self.evaluated_at = step
        return metrics

    def _compositional(self, model: Any) -> dict[str, float]:
        """``compositional/<medium>/<category>/<score>``: every rank scores the same samples (ZeRO-3 safe)."""
        assert self.loader is not None
        data = self.cfg.data
        preprocess: dict[str, Any] = {m: to_dict(getattr(data, m)) for m in ("image", "video", "audio")}
        preprocess["text"] = {"max_length": data.text.max_length}
        backbone = Backbone(model, preprocess, self.loader.decoder.tokenizer, Path(self.cfg.output_dir))
        result = evaluate_items(backbone, self.compositional, self.train_captions, self.skipped, data.batch_size)
        out: dict[str, float] = {}
        for medium, res in result["media"].items():
            for category, entry in res["categories"].items():
                for score, split in entry["scores"].items():
                    out[f"compositional/{medium}/{category}/{score}"] = split["all"]
            for score, groups in res["winoground"].items():
                if score != "pairs":
                    out[f"compositional/{medium}/winoground/{score}/group"] = groups["group"]
        return out
