"""Run by torchrun (2 gloo ranks) from test_collectives.py: accord.collectives' results, and what its audit says
about a direct call from accord code and about a tensor on a device the backend does not take. Each rank writes
``<out>/rank<R>.json``."""

from __future__ import annotations

import json
import sys
import types

import torch
import torch.distributed as dist

from accord import collectives


def misuse(call) -> str:
    try:
        call()
    except collectives.CollectiveMisuse as e:
        return str(e)
    return ""


def main(out: str) -> None:
    dist.init_process_group("gloo")
    collectives.install_audit()
    rank = dist.get_rank()
    x = torch.tensor([float(rank + 1)])
    result = {
        "sum": collectives.all_reduce(x).item(),
        "max": collectives.all_reduce(x, "max").item(),
        "x_after": x.item(),  # all_reduce leaves its input as it was
        "gathered": [t.item() for t in collectives.all_gather(x)],
        "global_max": collectives.global_max(10 * rank),
        "objects": collectives.all_gather_object({"rank": rank}),
        "broadcast": collectives.broadcast_object(f"from {rank}"),
        "device": str(collectives.collective_device()),
    }
    collectives.barrier()
    # accord code that bypasses accord.collectives: a module of the accord package calling torch.distributed itself
    planted = types.ModuleType("accord.planted")
    exec("import torch, torch.distributed as dist\ndef f():\n    dist.all_reduce(torch.ones(1))\n", planted.__dict__)
    result["direct"] = misuse(planted.f)
    dist.destroy_process_group()

    # A backend that takes CUDA tensors only (gloo underneath, declared like NCCL): a CPU tensor is refused by name.
    dist.Backend.register_backend(
        "cudaonly", lambda store, r, size, timeout: dist.ProcessGroupGloo(store, r, size, timeout), devices=["cuda"]
    )
    dist.init_process_group("cudaonly")
    result["backend_devices"] = collectives.backend_devices()
    result["wrong_device"] = misuse(lambda: dist.all_reduce(torch.ones(1)))
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
