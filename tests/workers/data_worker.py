"""Run by torchrun (2 gloo ranks x 2 data workers) from test_data.py; writes what each rank saw as JSON."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from accord import collectives
from accord.data.loader import Loader
from accord.modalities import MODALITIES

from helpers.tiny import data_config


def epochs(loader: Loader, n: int) -> list[list[list[str]]]:
    return [[batch["__key__"] for batch in loader] for _ in range(n)]


def main(shards: str, out: str) -> None:
    dist.init_process_group("gloo")
    collectives.install_audit()  # every collective checked (accord.collectives)
    rank = dist.get_rank()
    result: dict = {}
    # Finite: two epochs, and an interrupted run resumed from a saved state after 2 batches.
    result["finite"] = epochs(Loader(data_config(shards), MODALITIES), 2)
    first = Loader(data_config(shards), MODALITIES)
    head = []
    for batch in first:
        head.append(batch["__key__"])
        if len(head) == 2:
            state = first.state_dict()
            break
    first.close()
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, json.loads(json.dumps(state)))  # as they come back from a checkpoint
    resumed = Loader(data_config(shards), MODALITIES)
    resumed.load_state_dict(states)
    result["resumed_head"] = head
    result["resumed"] = epochs(resumed, 2)
    # Resampled: same seed twice, then another seed.
    for name, seed in (("resampled_a", 0), ("resampled_b", 0), ("resampled_c", 1)):
        cfg = data_config(shards, mode="resampled", seed=seed, epoch_samples=24)
        result[name] = epochs(Loader(cfg, MODALITIES), 2)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
