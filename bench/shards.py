"""Shard-building throughput: accord's builder vs img2dataset on the same local images.

Both tools read the same JPEGs (img2dataset through file:// URLs), resize keep_ratio to 256, encode JPEG q95,
write webdataset tars with the same number of processes. img2dataset pins webdataset<0.3, so it gets its own
venv under bench/_work (created on first use; needs PyPI). Prints samples/s of both and the ratio.

    python bench/shards.py --images 3000 --processes 2
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
PEER_VENV = WORK / "venv-img2dataset"
PEER = "img2dataset==1.47.0"


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-like JPEGs of assorted sizes (smooth gradients + noise + shapes), 320..1024 px wide."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(320, 1025)), int(rng.integers(240, 769))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        c = rng.uniform(0, 1, size=(3, 3))
        img = np.stack([c[k, 0] * x / w + c[k, 1] * y / h + c[k, 2] for k in range(3)], -1) * 160
        img += rng.normal(0, 12, size=img.shape)
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, size=3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(f"synthetic photo {i}")


def ensure_peer() -> Path:
    exe = PEER_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {PEER_VENV} with {PEER} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin/pip"), "install", "-q", PEER], check=True)
    return exe


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def count_written(folder: Path) -> int:
    import tarfile

    return sum(sum(1 for m in tarfile.open(t).getnames() if m.endswith(".jpg")) for t in folder.glob("*.tar"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternate runs of each tool; best time is reported")
    args = p.parse_args()

    images = WORK / f"images-{args.images}"
    make_images(images, args.images)
    manifest = WORK / f"urls-{args.images}.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for jpg in sorted(images.glob("*.jpg")):
            w.writerow([jpg.as_uri(), jpg.with_suffix(".txt").read_text()])
    peer = ensure_peer()
    out_a, out_b = WORK / "out-accord", WORK / "out-img2dataset"
    accord_cmd = [
        sys.executable,
        str(HERE.parent / "data_tools/build_shards.py"),
        "--input",
        str(images),
        "--output",
        str(out_a),
        "--workers",
        str(args.processes),
        "--resize-mode",
        "keep_ratio",
        "--image-size",
        "256",
        "--image-format",
        "jpg",
        "--image-quality",
        "95",
        "--samples-per-shard",
        "1000",
        "--overwrite",
        "--quiet",
    ]
    peer_cmd = [
        str(peer),
        "--url_list",
        str(manifest),
        "--input_format",
        "csv",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_folder",
        str(out_b),
        "--output_format",
        "webdataset",
        "--processes_count",
        str(args.processes),
        "--thread_count",
        "4",
        "--image_size",
        "256",
        "--resize_mode",
        "keep_ratio",
        "--encode_format",
        "jpg",
        "--encode_quality",
        "95",
        "--number_sample_per_shard",
        "1000",
        "--distributor",
        "multiprocessing",
        "--enable_wandb",
        "False",
        "--timeout",
        "30",
        "--retries",
        "0",
    ]
    times: dict[str, list[float]] = {"accord": [], "img2dataset": []}
    for _ in range(args.repeats):
        shutil.rmtree(out_b, ignore_errors=True)
        times["img2dataset"].append(timed(peer_cmd))
        times["accord"].append(timed(accord_cmd))
    written = {"accord": count_written(out_a), "img2dataset": count_written(out_b)}
    rate = {k: written[k] / min(v) for k, v in times.items()}
    result = {
        "images": args.images,
        "processes": args.processes,
        "written": written,
        "seconds_best": {k: round(min(v), 2) for k, v in times.items()},
        "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_accord_vs_img2dataset": round(rate["accord"] / rate["img2dataset"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
