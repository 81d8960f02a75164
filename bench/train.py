"""Training throughput: accord's trainer vs open_clip's (``open_clip_train.main``), same model, data and ranks.

Both train a CLIP-architecture model of the same sizes (ViT image tower + causal text transformer, quick-GELU,
pre-LN, the same embedding size and vocabulary: accord's ``clip_vision`` / ``clip_text`` towers, open_clip's
``VisionTransformer`` / ``TextTransformer`` from a local-dir config), on the same image-text shards with the same
tokenizer (all-MiniLM-L6-v2's), image size, global batch, fp32, AdamW, local loss with gathered features, one data
worker per rank, 2 CPU ranks (open_clip: torchrun + DDP; accord: the deepspeed launcher at ZeRO 0/1/2/3, and ZeRO-2
with ``accum_steps`` 2 at half the micro-batch). Steady state: samples/s over the logged windows after the first
two. Peak RSS: the largest process of each run (getrusage of the waited children). Then one more accord run with
``log.profile_start`` gives the per-stage breakdown (docs/benchmarks.md). open_clip_train 3.3.0 runs from its own
venv under bench/_work (made on first use, as bench/loader.py does).

    python bench/train.py --samples 3072 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
sys.path.insert(0, str(HERE))
from loader import TOKENIZER, ensure_peer  # noqa: E402

WRAP = (
    "import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(json.dumps({'rc': rc, 'peak_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)
# open_clip_train 3.3.0 gives DDP device_ids=[cpu] on CPU, which torch 2.11 refuses; this shim drops device_ids for
# CPU devices (the only change) and runs open_clip_train.main as torchrun would.
CPU_DDP_SHIM = """import sys
import torch

class CpuDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)

torch.nn.parallel.DistributedDataParallel = CpuDDP
from open_clip_train.main import main
main(sys.argv[1:])
"""
WORDS = (
    "red green blue small large round square bright dark photo of a the with near under striped dotted "
    "wooden metal glass street field sky river house tree dog cat car boat bird"
).split()


def make_shards(n: int, image_px: int) -> Path:
    """n photo-like JPEGs (about 1.5x the model's image size) with captions of 6-24 words, in shards of 64 (an even
    number of equal shards: both ranks get the same number of samples)."""
    from PIL import Image

    shards = WORK / f"train-shards-{n}-{image_px}"
    if (shards / "sizes.json").exists():
        return shards
    raw = WORK / f"train-raw-{n}-{image_px}"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = int(image_px * 1.5)
    for i in range(n):
        y, x = np.mgrid[0:side, 0:side].astype(np.float32)
        c = rng.uniform(0, 1, size=(3, 3))
        img = np.stack([c[k, 0] * x / side + c[k, 1] * y / side + c[k, 2] for k in range(3)], -1) * 160
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(raw / f"{i:06d}.jpg", quality=90)
        (raw / f"{i:06d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(6, 25)))))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_tools/build_shards.py"),
            "--input",
            str(raw),
            "--output",
            str(shards),
            "--image-size",
            str(side),
            "--samples-per-shard",
            "64",
            "--workers",
            "2",
            "--quiet",
        ],
        check=True,
    )
    return shards


def sizes(args: argparse.Namespace) -> dict:
    return {
        "image": args.image_size,
        "patch": args.patch_size,
        "width": args.width,
        "layers": args.layers,
        "heads": args.width // 64,
        "text_width": args.width,
        "text_layers": args.layers,
        "text_heads": args.width // 64,
        "context": args.context,
        "embed": args.embed_dim,
    }


def accord_config(args: argparse.Namespace, folder: Path) -> Path:
    """The model as accord towers (CLIP kinds, quick-GELU by default)."""
    import yaml

    s = sizes(args)
    cfg = {
        "model": {
            "embed_dim": s["embed"],
            "pairs": "text_anchored",
            "towers": {
                "text": {
                    "kind": "clip_text",
                    "hf": {
                        "vocab_size": 30522,
                        "hidden_size": s["text_width"],
                        "num_hidden_layers": s["text_layers"],
                        "num_attention_heads": s["text_heads"],
                        "intermediate_size": 4 * s["text_width"],
                        "max_position_embeddings": s["context"],
                        "bos_token_id": 101,
                        "eos_token_id": 102,
                        "pad_token_id": 0,
                    },
                },
                "image": {
                    "kind": "clip_vision",
                    "hf": {
                        "image_size": s["image"],
                        "patch_size": s["patch"],
                        "hidden_size": s["width"],
                        "num_hidden_layers": s["layers"],
                        "num_attention_heads": s["heads"],
                        "intermediate_size": 4 * s["width"],
                    },
                },
            },
        },
        "loss": {"kind": "infonce", "gather": "local"},
        "data": {
            "workers": 1,
            "shuffle_buffer": 1000,
            "text": {"tokenizer": TOKENIZER, "max_length": s["context"]},
            "image": {"size": s["image"], "train_scale": [0.9, 1.0]},
        },
        "optim": {"lr": 5.0e-4, "weight_decay": 0.2, "warmup_steps": 10},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "checkpoint": {"every": 1000000, "keep_last": 1},
        "epochs": 1,
    }
    path = folder / "accord.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def open_clip_model_dir(args: argparse.Namespace, folder: Path) -> Path:
    """The same model as an open_clip local-dir config, with the MiniLM tokenizer's files beside it."""
    from accord.resources import resolve_local_dir

    s = sizes(args)
    model = folder / "open_clip_model"
    model.mkdir(parents=True, exist_ok=True)
    tok = Path(resolve_local_dir(TOKENIZER))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, model / name)
    cfg = {
        "model_cfg": {
            "embed_dim": s["embed"],
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": s["image"],
                "layers": s["layers"],
                "width": s["width"],
                "patch_size": s["patch"],
                "head_width": s["width"] // s["heads"],
                "mlp_ratio": 4.0,
            },
            "text_cfg": {
                "context_length": s["context"],
                "vocab_size": 30522,
                "width": s["text_width"],
                "heads": s["text_heads"],
                "layers": s["text_layers"],
                "hf_tokenizer_name": str(model),
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (model / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    return model


def run_wrapped(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> float:
    """Run ``cmd`` (its output to ``log``); the peak RSS in MiB of its largest process."""
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", WRAP, *cmd], stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=cwd
        )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    log.write_text(log.read_text() + "\n".join(lines[:-1]))
    if result["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:6])} ...\n{log.read_text()[-3000:]}")
    return result["peak_rss_mib"]


def steady(rates: list[float]) -> float:
    """Mean over the logged windows without the first two (start-up, warm-up) and the last (the epoch's tail)."""
    return statistics.fmean(rates[2:-1]) if len(rates) > 4 else statistics.fmean(rates)


def run_open_clip(args: argparse.Namespace, shards: Path, folder: Path, env: dict[str, str]) -> dict:
    python = ensure_peer()
    model = open_clip_model_dir(args, folder)
    n = len(list(shards.glob("*.tar")))
    logs = folder / f"open_clip-logs-{len(list(folder.glob('open_clip-logs-*')))}"
    shim = folder / "open_clip_cpu_ddp.py"
    shim.write_text(CPU_DDP_SHIM)
    cmd = [
        str(python),
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(args.port),
        str(shim),
        "--model",
        f"local-dir:{model}",
        "--train-data",
        str(shards / f"shard-{{000000..{n - 1:06d}}}.tar"),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--workers",
        "1",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--lr",
        "5e-4",
        "--wd",
        "0.2",
        "--warmup",
        "10",
        "--local-loss",
        "--gather-with-grad",
        "--log-every-n-steps",
        str(args.log_every),
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--name",
        "bench",
        "--seed",
        "0",
    ]  # logs in ./logs (torchrun would take --logs as its --logs-specs)
    logs.mkdir()
    rss = run_wrapped(cmd, env, folder / f"{logs.name}.log", cwd=logs)
    text = (logs / "logs" / "bench" / "out.log").read_text()
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    global_batch = 2 * args.batch_size
    return {"samples_per_s": round(global_batch / steady(times), 2), "windows": len(times), "peak_rss_mib": round(rss)}


def run_accord(
    args: argparse.Namespace,
    shards: Path,
    folder: Path,
    env: dict[str, str],
    stage: int,
    accum: int = 1,
    profile: bool = False,
) -> dict:
    config = accord_config(args, folder)
    out = folder / f"accord-z{stage}-a{accum}{'-profile' if profile else ''}-{len(list(folder.glob('accord-*')))}"
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--log_level",
        "error",
        "--num_gpus",
        "2",
        "--master_port",
        str(args.port),
        "--module",
        "accord.train",
        "--config",
        str(config),
        f"data.train={shards}",
        f"output_dir={out}",
        f"deepspeed.zero_stage={stage}",
        f"accum_steps={accum}",
        f"data.batch_size={args.batch_size // accum}",
        f"log.every={args.log_every}",
    ]
    if profile:
        cmd += [f"log.profile_start={2 * args.log_every + 1}", f"log.profile_steps={2 * args.log_every}"]
    rss = run_wrapped(cmd, env, out.with_suffix(".log"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    result = {
        "samples_per_s": round(steady(rates), 2),
        "windows": len(rates),
        "peak_rss_mib": round(rss),
        "rank_peak_rss_mib": max(max(r["peak_rss_mib_per_rank"]) for r in rows if "peak_rss_mib_per_rank" in r),
    }
    if profile:
        result["stages_ms_per_step"] = json.loads((out / "profile/rank00000.stages.json").read_text())["ms_per_step"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=3072, help="samples in the shards = one epoch of each run")
    p.add_argument("--batch-size", type=int, default=32, help="per rank (global batch: 2x)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of open_clip and accord ZeRO-0; best kept")
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args()
    if args.width % 64:
        raise SystemExit("--width: must be a multiple of 64 (heads of 64 channels)")
    if args.samples % (2 * 64) or (args.samples // 2) % args.batch_size:
        raise SystemExit("--samples: must fill shards of 64 evenly over 2 ranks and whole batches on each")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    shards = make_shards(args.samples, args.image_size)
    folder = Path(tempfile.mkdtemp(prefix="train-bench-", dir=WORK))
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate, keep each tool's best run
        for name, run in (
            ("open_clip", lambda: run_open_clip(args, shards, folder, env)),
            ("accord_zero0", lambda: run_accord(args, shards, folder, env, 0)),
        ):
            res = run()
            print(name, json.dumps(res), flush=True)
            if name not in best or res["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = res
    for stage, accum in ((1, 1), (2, 1), (3, 1), (2, 2)):
        best[f"accord_zero{stage}" + (f"_accum{accum}" if accum > 1 else "")] = res = run_accord(
            args, shards, folder, env, stage, accum
        )
        print(f"accord zero{stage} accum{accum}", json.dumps(res), flush=True)
    profile = run_accord(args, shards, folder, env, 2, profile=True)
    ref = best["open_clip"]["samples_per_s"]
    result = {
        "settings": {
            **sizes(args),
            "samples": args.samples,
            "global_batch": 2 * args.batch_size,
            "ranks": 2,
            "precision": "fp32",
            "workers_per_rank": 1,
        },
        "runs": best,
        "ratio_vs_open_clip": {k: round(v["samples_per_s"] / ref, 3) for k, v in best.items()},
        "accord_zero2_stages_ms_per_step": profile["stages_ms_per_step"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
