"""Start-up and shut-down costs of a training process, measured in fresh interpreters:

1. **Fresh data workers** (every evaluation's loader, an epoch without persistent workers): time to a loader's first
   batch, twice in one process, with the forkserver preloaded by ``warm_workers`` (what every Loader does) and with
   ``warm_workers`` switched off (the code before it).
2. **Process end**: seconds from a training run's return (tiny config, one process, 12 steps) to the process's
   exit, through ``accord.shutdown.end_process`` (the entry points) and through a plain ``sys.exit``.

    python bench/startup.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from accord.shards.build import BuildConfig, build  # noqa: E402

from helpers.media import solid, write_audio, write_video  # noqa: E402

LOADERS = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
import accord.data.loader as loader_module
from accord.data.loader import Loader, warm_workers
from accord.modalities import MODALITIES
from helpers.tiny import data_config
if __name__ == "__main__":
    shards, warm = sys.argv[1], sys.argv[2] == "warm"
    cfg = data_config(shards, val=shards, batch_size=4, workers=1, persistent_workers=False, start_method="forkserver")
    if warm:
        warm_workers(cfg, MODALITIES)
    else:  # as before warm_workers: the forkserver preloads nothing, each worker imports for itself
        loader_module.warm_workers = lambda cfg, modalities: None
    firsts = []
    for _ in range(2):
        start = time.perf_counter()
        batches = iter(Loader(cfg, MODALITIES, train=False, rank=0, world=1))
        next(batches)
        firsts.append(time.perf_counter() - start)
        for _ in batches:
            pass
    print(json.dumps(firsts))
"""

END = """
import sys, time
from accord.shutdown import end_process
from accord.train.main import main
if __name__ == "__main__":
    code = main(sys.argv[2:])
    print(time.time(), flush=True)
    end_process(code) if sys.argv[1] == "end_process" else sys.exit(code)
"""


def make_shards(folder: Path) -> Path:
    """12 samples of every medium: images, videos, audio, each with a caption."""
    raw = folder / "raw"
    raw.mkdir()
    for i in range(12):
        stem = raw / f"s{i:03d}"
        if i % 3 == 0:
            write_video(stem.with_suffix(".mp4"), seconds=0.5, size=(32, 24), color="red")
        elif i % 3 == 1:
            write_audio(stem.with_suffix(".wav"), seconds=0.3, rate=16000, channels=1, freq=440.0)
        else:
            solid((200, 30, 30), 40, 30, seed=i).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"a red thing number {i}")
    build(BuildConfig(input=str(raw), output=str(folder / "shards"), samples_per_shard=3, progress=False))
    return folder / "shards"


def script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench_out/startup.json")
    args = p.parse_args()
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = make_shards(folder)
        loaders, end = script(folder, "loaders.py", LOADERS), script(folder, "end.py", END)
        train = ["--config", str(ROOT / "configs/tiny.yaml"), f"data.train={shards}", "max_steps=12"]
        for r in range(args.repeats):
            for mode in ("warm", "cold"):
                out = subprocess.run([sys.executable, str(loaders), str(shards), mode], capture_output=True, text=True)
                assert out.returncode == 0, out.stderr[-2000:]
                results.setdefault(f"first batch, fresh workers ({mode})", []).append(json.loads(out.stdout))
            for how in ("end_process", "sys.exit"):
                cmd = [sys.executable, str(end), how, *train, f"output_dir={folder / f'run{r}{how}'}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                ended = time.time()
                assert proc.returncode == 0, proc.stderr[-2000:]
                results.setdefault(f"exit after the run returned ({how})", []).append(
                    ended - float(proc.stdout.strip().splitlines()[-1])
                )
    print(f"{'what':<48} {'median s':>9}  runs")
    for what, runs in results.items():
        if isinstance(runs[0], list):  # two loaders per process: the first starts the forkserver
            for i, label in enumerate(("1st loader", "2nd loader")):
                vals = [run[i] for run in runs]
                print(f"{what + ', ' + label:<48} {statistics.median(vals):>9.2f}  {[round(v, 2) for v in vals]}")
        else:
            print(f"{what:<48} {statistics.median(runs):>9.2f}  {[round(v, 2) for v in runs]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
