"""Run by torchrun (2 gloo ranks) from test_loss.py; the single-process reference is computed there (helpers.tiny).

Each rank takes its slice of a fixed global batch, runs the tiny 4-tower model and the loss, backpropagates,
averages parameter gradients over ranks (as DDP/DeepSpeed do), and rank 0 saves loss and gradients.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from accord import collectives
from accord.losses.contrastive import gather_nograd

from helpers.tiny import GLOBAL_BATCH, VARIANTS, run, slice_batch, tiny_model, variant_batch


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    collectives.install_audit()  # every collective checked (accord.collectives)
    rank, size = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // size
    model = tiny_model(init_logit_bias=-10.0)
    results = {}
    for variant in VARIANTS:
        res = run(model, variant, slice_batch(variant_batch(variant), rank * n, (rank + 1) * n))
        loss = res["loss"].clone()
        dist.all_reduce(loss)
        for g in res["params"].values():  # the usual data-parallel averaging
            dist.all_reduce(g)
            g /= size
        features = {m: gather_nograd(g) / size for m, g in res["features"].items()}  # rows: rank order
        results[variant] = {"loss": loss / size, "params": res["params"], "features": features}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
