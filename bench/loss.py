"""Peak memory and time of the contrastive loss: local logits (n x N) vs global logits (N x N).

A large global batch N = W x n is simulated in one process: torch's fake process group supplies rank 0 of W,
and the all-gathers are replaced by tiling the local features to N rows, so rank 0 does exactly the matmuls,
softmaxes and allocations it would do among W ranks (communication time is not included).
Each measurement runs in a fresh subprocess; CPU peak memory is the rise of the resident-set high-water mark
(``ru_maxrss``), GPU peak memory is ``torch.cuda.max_memory_allocated``.

    python bench/loss.py --world 32 --batches 4096 8192 16384 --dim 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(kind: str, gather: str, world: int, global_batch: int, dim: int, device: str) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from accord.losses import ContrastiveLoss, LossConfig
    from accord.models.model import ModelOutput

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    n = global_batch // world
    torch.manual_seed(0)
    a = F.normalize(torch.randn(n, dim, device=device), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, dim, device=device), dim=-1).requires_grad_()
    scale = torch.tensor([14.0], device=device, requires_grad=True)
    bias = torch.tensor([-10.0], device=device, requires_grad=True)
    out = ModelOutput(
        {"text": a, "image": b},
        {
            "text": torch.ones(n, dtype=torch.bool, device=device),
            "image": torch.ones(n, dtype=torch.bool, device=device),
        },
        {"text-image": scale},
        {"text-image": bias},
        [("text", "image")],
    )
    loss_fn = ContrastiveLoss(LossConfig(kind=kind, gather=gather))
    # Replace the gathers: the fake group's all_gather would leave the outputs uninitialised.
    import accord.losses.contrastive as C

    C.gather_with_grad = lambda x: x.repeat(world, 1) if world > 1 else x
    C.gather_nograd = lambda x: x.repeat(world) if x.dim() == 1 else x.repeat(world, 1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss, _ = loss_fn(out)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": min(times), "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["infonce", "siglip"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, gather, world, n, dim = args.worker
        print(json.dumps(worker(kind, gather, int(world), int(n), int(dim), args.device)))
        return
    rows = []
    print(f"world {args.world} (simulated), dim {args.dim}, device {args.device}: one rank's loss forward+backward")
    print(
        f"{'loss':8} {'global N':>9} {'local n':>8} | {'global: ms':>10} {'MiB':>8} | {'local: ms':>9} {'MiB':>8} |"
        f" {'memory ratio':>12} {'speedup':>8}"
    )
    for kind in args.kinds:
        for n in args.batches:
            res = {}
            for gather in ("global", "local"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--worker",
                    kind,
                    gather,
                    str(args.world),
                    str(n),
                    str(args.dim),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-2000:])
                res[gather] = json.loads(proc.stdout.strip().splitlines()[-1])
            g, l_ = res["global"], res["local"]
            mem_ratio = g["peak_bytes"] / max(l_["peak_bytes"], 1)
            speed = g["seconds"] / l_["seconds"]
            rows.append(
                {
                    "kind": kind,
                    "global_batch": n,
                    "world": args.world,
                    **{f"{k}_{m}": v for k, r in res.items() for m, v in r.items()},
                }
            )
            print(
                f"{kind:8} {n:9d} {n // args.world:8d} | {g['seconds'] * 1e3:10.1f} {g['peak_bytes'] / 2**20:8.0f} |"
                f" {l_['seconds'] * 1e3:9.1f} {l_['peak_bytes'] / 2**20:8.0f} | {mem_ratio:11.1f}x {speed:7.1f}x"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
