"""Run by torchrun (2 gloo ranks) from test_loss.py; also imported there for the single-process reference.

Each rank takes its slice of a fixed global batch, runs the tiny 4-tower model and the loss, backpropagates,
averages parameter gradients over ranks (as DDP/DeepSpeed do), and rank 0 saves loss and gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from accord.config import from_dict
from accord.losses import ContrastiveLoss, LossConfig
from accord.losses.contrastive import gather_nograd
from accord.models import AccordModel, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
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
    data = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]
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


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // size
    model = tiny_model(init_logit_bias=-10.0)
    results = {}
    for variant in VARIANTS:
        res = run(model, variant, slice_batch(global_batch(variant[2]), rank * n, (rank + 1) * n))
        loss = res["loss"].clone()
        dist.all_reduce(loss)
        for g in res["params"].values():  # the usual data-parallel averaging
            dist.all_reduce(g)
            g /= size
        features = {m: gather_nograd(g) / size for m, g in res["features"].items()}
        results[variant] = {"loss": loss / size, "params": res["params"], "features": features}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
