"""Shard builds as the input grows: peak memory and time per row at 10k, 100k and 1M manifest rows.

Each size is one ``data_tools/build_shards.py`` run in a process of its own, on a synthetic jsonl manifest whose
rows point at 16 tiny PNGs (so the run measures the builder, not the codec: 8 px images stored as 8 px JPEGs) with
300-byte captions. Peak RSS is sampled every 0.1 s, for the build's main process and for its whole process tree (the
workers included); each phase's time per row comes from the build's ``stats.json`` (``phase_seconds``), and what
is left of the wall time is the process's start (interpreter, imports) and exit. Targets (issue #30): peak RSS at
the largest size within 1.2x of the smallest; time per row within 1.2x across sizes.

    .venv/bin/python bench/build_scale.py --rows 10000 100000 1000000 --workers 2 [--repeat 3] [--dedupe sample]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "build_scale"
CAPTION = "a synthetic caption long enough to weigh what a real alt-text weighs in a manifest row " * 3


def write_inputs(folder: Path, rows: int) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(16):
        Image.new("RGB", (8, 8), (i * 16, 255 - i * 16, 128)).save(folder / "img" / f"{i}.png")
    manifest = folder / f"manifest-{rows}.jsonl"
    if not manifest.exists():
        with open(f"{manifest}.tmp", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"image": f"img/{i % 16}.png", "text": f"{i} {CAPTION}", "row": i}) + "\n")
        Path(f"{manifest}.tmp").rename(manifest)
    return manifest


def run(manifest: Path, out: Path, workers: int, dedupe: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "data_tools" / "build_shards.py"), "--input", str(manifest)]
    cmd += ["--output", str(out), "--workers", str(workers), "--image-size", "8", "--samples-per-shard", "10000"]
    cmd += ["--dedupe", dedupe, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            rss = main.memory_info().rss
            tree = rss + sum(c.memory_info().rss for c in main.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        except psutil.AccessDenied:
            continue
        peak_main, peak_tree = max(peak_main, rss), max(peak_tree, tree)
        time.sleep(0.1)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build of {manifest} failed: {err.strip().splitlines()[-1]}")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == stats["inputs"], stats
    return {
        "seconds": seconds,
        "rss_main_mib": peak_main / 2**20,
        "rss_tree_mib": peak_tree / 2**20,
        "phase_seconds": stats["phase_seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--dedupe", default="none", choices=("none", "sample"), help="sample: the dedupe pass runs (captions differ)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per size; the run of median time is reported")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    results = []
    for rows in args.rows:
        manifest = write_inputs(WORK, rows)
        runs = sorted(
            (run(manifest, WORK / f"out-{rows}", args.workers, args.dedupe) for _ in range(args.repeat)),
            key=lambda r: r["seconds"],
        )
        r = {"rows": rows, **runs[len(runs) // 2], "all_seconds": [round(x["seconds"], 2) for x in runs]}
        r["us_per_row"] = r["seconds"] / rows * 1e6
        results.append(r)
        print(
            f"{rows:>9} rows  {r['seconds']:8.1f} s  {r['us_per_row']:7.1f} us/row  "
            f"peak RSS main {r['rss_main_mib']:6.1f} MiB  tree {r['rss_tree_mib']:6.1f} MiB"
            + (f"  (median of {args.repeat}: {r['all_seconds']} s)" if args.repeat > 1 else ""),
            flush=True,
        )
        order = ("survey", "plan_blocks", "process", "dedupe", "plan_shards", "write_shards")
        phases = ", ".join(f"{k} {r['phase_seconds'][k] / rows * 1e6:.0f}" for k in order if k in r["phase_seconds"])
        start = r["seconds"] - sum(r["phase_seconds"].values())
        print(f"{'':>15}us/row by phase: {phases}; start, staging removal and exit {start:.2f} s", flush=True)
        shutil.rmtree(WORK / f"out-{rows}", ignore_errors=True)
    first, last = results[0], results[-1]
    per_row = [r["us_per_row"] for r in results]
    print(
        f"RSS {last['rows']} / {first['rows']} rows: main {last['rss_main_mib'] / first['rss_main_mib']:.2f}x, "
        f"tree {last['rss_tree_mib'] / first['rss_tree_mib']:.2f}x (target <= 1.2x); "
        f"time per row max/min {max(per_row) / min(per_row):.2f}x (target <= 1.2x)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
