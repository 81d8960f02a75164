"""The device check: one command that measures accord's GPU path and writes every figure to a folder.

    python bench/gpu.py --out bench_out/gpu            # one GPU: at most about 8 minutes
    python bench/gpu.py --smoke --out /tmp/gpu-smoke   # CPU: the same code at tiny size (a test runs it)
    python bench/gpu.py --out bench_out/knobs-cpu --config tiny --steps 30 --skip loader score process_group \
        --grid 32:fp32 32:bf16 32:autocast_bf16 32:fp32+compiled 32:fp32+fused   # what each knob does on a CPU

1. **train**: ``accord.train`` on synthetic batches (``data.synthetic``: the step alone), ViT-B/16 + text tower
   (configs/vit_b16_text.yaml), one process: two batch sizes eager with DeepSpeed bf16, and at the larger one
   DeepSpeed bf16 vs ``autocast_bf16``, eager vs compiled (``--full-grid``: every combination). Each run's last log
   window (after compilation): samples/s, model TFLOP/s, MFU, peak memory.
2. **loader**: the real loader alone (``accord.data.Loader``) on generated JPEG shards, 224 px crops, as many workers
   as the machine has cores: samples/s against the fastest training run.
3. **score**: ``bench/score.py`` on this device (bf16 on a GPU) against torchmetrics' CLIPScore.
4. **process group**: accord's ``init_distributed`` with ``dist_timeout_s``: the backend, the timeout its watchdog
   got, where accord's collectives run, and the audit refusing a tensor on the wrong device.

Everything lands in ``--out`` as JSON (one file per part and ``summary.json``); a summary table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SIZES = {  # --smoke: the tiny text and image towers, few steps; otherwise the ViT-B/16 check
    "smoke": {"config": "smoke", "batches": (4, 8), "steps": 4, "every": 2, "images": 64},
    "gpu": {"config": "vit_b16_text", "batches": (128, 256), "steps": 30, "every": 10, "images": 2048},
}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}


def train_grid(size: dict, full: bool, smoke: bool) -> list[tuple[int, str]]:
    """(batch, variant) of each training run; a variant is a precision with ``+compiled`` / ``+fused`` (the smoke
    run: each code path once)."""
    small, large = size["batches"]
    if smoke and not full:
        return [(small, "bf16"), (large, "autocast_bf16"), (large, "bf16+compiled")]
    if full:
        return [(b, p + c) for b in (small, large) for p in ("bf16", "autocast_bf16") for c in ("", "+compiled")]
    return [(small, "bf16"), (large, "bf16"), (large, "autocast_bf16"), (large, "bf16+compiled")] + [
        (large, "autocast_bf16+compiled")
    ]


def smoke_config(work: Path) -> str:
    """configs/tiny.yaml with its text and image towers only (the shape of the ViT-B/16 check)."""
    import yaml

    from accord.resources import config_file

    cfg = yaml.safe_load(Path(config_file("tiny")).read_text())
    cfg["model"]["towers"] = {m: cfg["model"]["towers"][m] for m in ("text", "image")}
    path = work / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_run(size: dict, work: Path, batch: int, variant: str, backend: str) -> dict:
    precision, *flags = variant.split("+")
    out = work / f"train-{batch}-{variant.replace('+', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        "data.synthetic=true",
        f"data.batch_size={batch}",
        f"max_steps={size['steps']}",
        f"log.every={size['every']}",
        "log.wandb=false",
        "optim.warmup_steps=1",
        f"deepspeed.precision={precision}",
        f"checkpoint.every={10 * size['steps']}",
        f"output_dir={out}",
    ]
    if "compiled" in flags:
        overrides += ["compile={}", f"compile.backend={backend}", "compile.dynamic=false"]
    if "fused" in flags:
        overrides += ["optim.fused=true"]
    config = smoke_config(work) if size["config"] == "smoke" else size["config"]
    cmd = [sys.executable, "-m", "accord.train", "--config", config, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    wall = time.perf_counter() - t0
    result = {"batch": batch, "variant": variant, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        return {**result, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "samples_per_s" in r][-1]  # the last window: compilation is behind it
    start = next((line for line in proc.stdout.splitlines() if line.startswith("towers:")), "")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {
        **result,
        "samples_per_s": round(last["samples_per_s"], 1),
        "model_tflops": float(f"{last['perf/model_tflops']:.4g}"),
        "mfu": None if last["perf/mfu"] is None else round(last["perf/mfu"], 4),
        "peak_memory_gib": last["perf/peak_memory_gib"],
        "peak_rss_mib": last["peak_rss_mib_per_rank"][0],
        "start": start,
    }


def loader_run(size: dict, work: Path, batch: int) -> dict:
    """The loader alone on generated shards, one worker per core."""
    from loader import run_accord
    from shards import make_images

    images, shards = work / "images", work / "shards"
    make_images(images, size["images"])
    build = [sys.executable, str(ROOT / "data_tools/build_shards.py"), "--input", str(images), "--output", str(shards)]
    workers = os.cpu_count() or 1
    per_shard = max(1, min(256, size["images"] // workers))  # a shard for every worker at least
    build += ["--image-size", "256", "--samples-per-shard", str(per_shard), "--workers", "2", "--quiet", "--resume"]
    subprocess.run(build, check=True, env=env())
    return {"workers": workers, "batch": batch, **run_accord(str(shards), workers, batch)}


def score_run(smoke: bool, device: str) -> dict:
    args = ["--pairs", "32", "--batch-size", "16", "--sizes", "small"] if smoke else ["--pairs", "8192"]
    args += [] if smoke else ["--batch-size", "256"]
    if device == "cuda":
        args += ["--device", "cuda", "--dtype", "bf16"]
    proc = subprocess.run([sys.executable, str(HERE / "score.py"), *args], capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    text = proc.stdout
    return json.loads(text[text.rindex("\n{\n") + 1 :] if "\n{\n" in text else text)


PROCESS_GROUP = """
import json, sys, torch, torch.distributed as dist
from accord import collectives
from accord.train.distributed import init_distributed
init_distributed(float(sys.argv[1]))
collectives.install_audit()
device = collectives.collective_device()
backend = dist.distributed_c10d._get_default_group()._get_backend(device)
t = torch.ones(1, device=device)
dist.all_reduce(t)
refused = ""
if device.type != "cpu":
    try:
        dist.all_reduce(torch.ones(1))
    except collectives.CollectiveMisuse as e:
        refused = str(e)
print(json.dumps({"backend": dist.get_backend_config(), "timeout_s": backend.options._timeout.total_seconds(),
                  "collective_device": str(device), "all_reduce_ok": t.item() == 1.0, "cpu_tensor_refused": refused}))
dist.destroy_process_group()
"""


def process_group_run(timeout_s: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROCESS_GROUP, str(timeout_s)], capture_output=True, text=True, env=env(), timeout=300
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON files")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any machine (CPU: under a minute or so)")
    p.add_argument("--full-grid", action="store_true", help="every batch x precision x compile combination")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--skip", nargs="*", default=[], choices=("train", "loader", "score", "process_group"))
    p.add_argument("--config", help="training config instead of the size's (e.g. tiny: the CPU configs)")
    p.add_argument("--steps", type=int, help="training steps per run (the last log window is reported)")
    p.add_argument(
        "--grid", nargs="*", help="training runs as BATCH:VARIANT, e.g. 32:fp32 32:fp32+compiled 32:bf16+fused"
    )
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = dict(SIZES["smoke" if args.smoke else "gpu"])
    if args.config:
        size["config"] = args.config
    if args.steps:
        size["steps"], size["every"] = args.steps, max(1, args.steps // 3)
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke}
    t0 = time.perf_counter()

    def part(name: str, fn) -> None:
        if name in args.skip:
            return
        start = time.perf_counter()
        result = fn()
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        summary[name] = result
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)

    grid = train_grid(size, args.full_grid, args.smoke)
    if args.grid:
        grid = [(int(b), v) for b, v in (g.split(":") for g in args.grid)]
    part("train", lambda: [train_run(size, work, *run, backend) for run in grid])
    part("loader", lambda: loader_run(size, work, size["batches"][1]))
    part("score", lambda: score_run(args.smoke, device))
    part("process_group", lambda: process_group_run(60.0))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))


def table(summary: dict) -> str:
    lines = [f"device {summary['device']}, {summary['wall_s']} s", ""]
    lines.append("| batch | variant | samples/s | TFLOP/s | MFU | peak GiB | wall s |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in summary.get("train", []):
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['samples_per_s']} | {r['model_tflops']} | {mfu} "
            f"| {mem} | {r['wall_s']} |"
        )
    if "loader" in summary:
        best = max((r.get("samples_per_s", 0) for r in summary.get("train", [])), default=0)
        rate = summary["loader"].get("steady_samples_per_s", 0)
        lines.append(f"\nloader: {rate:.1f} samples/s on {summary['loader']['workers']} workers (fastest step {best})")
    if "score" in summary:
        ratios = {
            k: v["ratio_accord_vs_torchmetrics"]
            for k, v in summary["score"].items()
            if isinstance(v, dict) and "ratio_accord_vs_torchmetrics" in v
        }
        lines.append("score: " + ", ".join(f"{k} {r}x torchmetrics" for k, r in ratios.items()))
    if "process_group" in summary:
        lines.append(f"process group: {json.dumps(summary['process_group'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
