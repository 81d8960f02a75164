"""Run by the deepspeed launcher (2 CPU ranks) from test_zero3.py: ZeRO-3 steps where ranks lack modalities.

Rank 1's batches never contain audio; rank 0's second batch has no video. Every rank still runs every tower (and,
with ``--generative``, the generative head for every pair), so the partitioned-parameter gathers match and no rank
waits forever.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist

from accord.losses import CaptionLoss, ContrastiveLoss, LossConfig
from accord.train.distributed import init_distributed

from helpers.tiny import GENERATIVE, tiny_model


def batch(rank: int, step: int, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    out = {
        "text": {
            "input_ids": torch.randint(1, 1000, (n, 6), generator=g),
            "attention_mask": torch.ones(n, 6, dtype=torch.long),
        },
        "image": {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)},
        "video": {"pixel_values": torch.randn(n, 4, 3, 32, 32, generator=g)},
    }
    if rank == 0:
        out["audio"] = {"features": torch.randn(n, 64, 32, generator=g)}
        if step == 1:
            out["present"] = {"video": torch.zeros(n, dtype=torch.bool)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--generative", action="store_true", help="with the generative head and its caption loss")
    args = p.parse_args()
    init_distributed()
    model = (tiny_model(generative=GENERATIVE) if args.generative else tiny_model()).float().train()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss_fn = ContrastiveLoss(LossConfig())
    caption_loss = CaptionLoss(GENERATIVE["null_weight"])
    losses = []
    for step in range(3):
        out = engine(batch(dist.get_rank(), step))
        loss, parts = loss_fn(out)
        if args.generative:  # every rank runs the head for every pair, also the one without audio
            caption, caption_parts = caption_loss(out, engine.module.generative, model.cfg.generative_pairs())
            loss, parts = loss + caption, {**parts, **caption_parts}
        engine.backward(loss)
        engine.step()
        losses.append({k: float(v) for k, v in parts.items()})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()  # before exit: gloo's threads must not be torn down by the interpreter's exit


if __name__ == "__main__":
    main()
