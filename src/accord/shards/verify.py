"""Verify a shard folder: read every shard with webdataset, check members and counts, optionally decode all.

Prints a JSON summary and exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from typing import Any

import fsspec
import webdataset as wds
import yaml
from tqdm import tqdm

from accord.config import ConfigError, from_dict
from accord.data.config import DataConfig
from accord.data.stream import seed_of
from accord.data.transforms import SampleDecoder
from accord.errors import InputError, command
from accord.modalities import COUNTERFACTUAL, MEDIA, MEMBER_EXTS, member_of
from accord.shards.build import check_shard_count

MAX_LISTED = 50


def data_config_of(path: str) -> DataConfig:
    """The ``data`` section of a training config file (or a file that is only that section)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(DataConfig, raw["data"] if "data" in raw else raw, "data")


def verify(
    folder: str,
    decode: bool = False,
    prefix: str = "shard",
    workers: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """Check every shard in ``folder``; returns the summary whose ``problems`` list is empty when all is well.
    ``decode`` decodes every media member with the training loader's decoder (``accord.data.transforms``) under
    ``data`` (frames, size, video backend, sample rate, features; default DataConfig()), with training's random
    crops, seeded per sample."""
    fs, root = fsspec.core.url_to_fs(folder)
    decoder = SampleDecoder(data or DataConfig(), MEDIA, train=True)
    if not fs.isdir(root):
        raise InputError(f"{folder}: {'not a directory' if fs.exists(root) else 'no such directory'}")
    base = folder.rstrip("/")
    problems: list[str] = []
    warnings: list[str] = []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/{prefix}-*.tar"))
    if not names:
        problems.append(f"no {prefix}-*.tar shards in {folder}")
    sizes: dict[str, int] = {}
    if fs.exists(f"{root}/sizes.json"):
        with fs.open(f"{root}/sizes.json") as f:
            sizes = json.load(f)
    else:
        problems.append("sizes.json is missing")
    leftovers = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/{prefix}-*.tar.tmp")]
    if leftovers:
        problems.append(f"unfinished shards (a build was interrupted): {leftovers}")
    counts: dict[str, int] = {}
    modalities: Counter[str] = Counter()
    keys: set[str] = set()
    n_bad = 0
    counterfactuals = 0  # samples that carry a counterfactual pair

    def problem(text: str) -> None:
        nonlocal n_bad
        n_bad += 1
        if n_bad <= MAX_LISTED:
            problems.append(text)

    for name in tqdm(names, desc="verify", unit="shard", disable=not progress):
        ds = wds.WebDataset(f"{base}/{name}", shardshuffle=False, handler=wds.reraise_exception, empty_check=False)
        count = 0
        try:
            for sample in ds:
                count += 1
                where = f"{name}:{sample['__key__']}"
                if sample["__key__"] in keys:
                    problem(f"{where}: key appears twice in the dataset")
                keys.add(sample["__key__"])
                if sample["__key__"].startswith("/") or ".." in sample["__key__"].split("/"):
                    problem(
                        f"{where}: unsafe member name (absolute or '..': extracting the tar would write outside "
                        "its folder)"
                    )
                text = sample.get("txt")
                try:
                    if not text or not text.decode("utf-8", errors="strict").strip():
                        problem(f"{where}: missing or empty caption (.txt)")
                except UnicodeDecodeError as e:
                    problem(f"{where}: caption is not UTF-8 (byte {e.start}: {e.reason})")
                try:
                    json.loads(sample.get("json", b""))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem(f"{where}: missing or invalid .json")
                present = [(m, ext) for m, exts in MEMBER_EXTS.items() for ext in exts if ext in sample]
                if not present:
                    problem(f"{where}: no image, video or audio member")
                pair = [(m, ext) for m in MEDIA if (ext := member_of(sample, m, f"{COUNTERFACTUAL}.")) is not None]
                if pair:
                    counterfactuals += 1
                    if not sample.get(f"{COUNTERFACTUAL}.txt", b"").strip():
                        problem(f"{where}: counterfactual {pair[0][0]} without its caption ({COUNTERFACTUAL}.txt)")
                modalities.update(m for m, _ in present)
                for modality, ext in present + pair:
                    if decode:
                        try:
                            rng = random.Random(seed_of(name, sample["__key__"]))
                            decoder.decode_medium(modality, sample[ext], rng)
                        except Exception as e:
                            problem(f"{where}.{ext}: cannot decode {modality}: {type(e).__name__}: {e}")
        except Exception as e:
            problem(f"{name}: unreadable tar after {count} samples: {type(e).__name__}: {e}")
        counts[name] = count
        if name in sizes and sizes[name] != count:
            problem(f"{name}: {count} samples but sizes.json says {sizes[name]}")
        if sizes and name not in sizes:
            problem(f"{name}: not listed in sizes.json")
    for name in sorted(set(sizes) - set(counts)):
        problem(f"{name}: listed in sizes.json but missing")
    if n_bad > MAX_LISTED:
        problems.append(f"... and {n_bad - MAX_LISTED} more problems")
    warning = check_shard_count(len(names), workers, world_size)
    if warning:
        warnings.append(warning)
    return {
        "folder": folder,
        "ok": not problems,
        "shards": len(names),
        "samples": sum(counts.values()),
        "modalities": dict(modalities),
        "counterfactuals": counterfactuals,
        "decoded": decode,
        "decode_settings": decode_settings(decoder.cfg) if decode else None,
        "problems": problems,
        "warnings": warnings,
    }


def decode_settings(cfg: DataConfig) -> dict[str, Any]:
    """What a decode check used (the data config's media settings)."""
    return {
        "image": {"size": cfg.image.size},
        "video": {"frames": cfg.video.num_frames, "size": cfg.video.size, "backend": cfg.video.backend},
        "audio": {"sample_rate": cfg.audio.sample_rate, "seconds": cfg.audio.seconds, "features": cfg.audio.features},
    }


@command("verify_shards")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify_shards", description=__doc__)
    p.add_argument("folder", help="shard folder written by build_shards")
    p.add_argument("--decode", action="store_true", help="decode every media member with the training decoders")
    p.add_argument(
        "--config",
        default=None,
        help="the training config whose data section --decode uses (frames, size, video backend, sample rate, "
        "features); default: the data defaults",
    )
    p.add_argument("--prefix", default="shard")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per rank, for the shard check")
    p.add_argument("--world-size", type=int, default=None, help="training ranks, for the shard check")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    data = data_config_of(args.config) if args.config else None
    summary = verify(args.folder, args.decode, args.prefix, args.workers, args.world_size, not args.quiet, data)
    print(json.dumps(summary, indent=2))
    for w in summary["warnings"]:
        print(f"verify_shards: warning: {w}", file=sys.stderr)
    return 0 if summary["ok"] else 1
