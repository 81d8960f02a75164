"""Run by torchrun (2 gloo ranks) from test_generative.py: each rank takes its half of the fixed global batch (rank
1 holds no audio in the masked batch), runs one contrastive + caption step in ``accum`` micro-batches, averages the
parameter gradients and the loss parts over ranks (as DeepSpeed does, and as the trainer logs), and rank 0 saves
them; the single-process reference on the whole batch is computed in the test."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from accord import collectives

from helpers.tiny import GLOBAL_BATCH, generative_model, generative_step, global_batch, slice_batch

VARIANTS = [(False, 1), (True, 1), (True, 2)]  # (presence masks, accum_steps)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    collectives.install_audit()  # every collective checked (accord.collectives)
    rank, size = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // size
    model = generative_model()
    results = {}
    for masked, accum in VARIANTS:
        res = generative_step(model, slice_batch(global_batch(masked), rank * n, (rank + 1) * n), accum)
        for t in (*res["params"].values(), *res["parts"].values()):
            dist.all_reduce(t)
            t /= size
        results[(masked, accum)] = res
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
