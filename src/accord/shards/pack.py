"""The last phase of a shard build: committed blocks into final shards, in two steps so that no one process
copies every byte.

1. :func:`plan_shards` (one process, metadata only): the blocks' commit records are read in order, duplicates
   dropped (found beforehand by :mod:`accord.shards.dedupe`) and samples assigned to shards by count and bytes (each
   record carries its sample's size in a tar); each shard's list of (block, keys) is written to staging, and
   ``failures.jsonl`` and ``duplicates.jsonl`` as the records are read.
2. :func:`write_shard` (any process, one shard each, in parallel: the build's worker pools on every node, claimed
   like blocks, or its Ray tasks): reads its samples from the block tars, writes ``PREFIX-NNNNNN.tar`` and marks
   the shard done.

A shard's bytes depend only on its list, so they are the same whichever process writes it, and the same as one
process packing the blocks in order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import fsspec
from tqdm import tqdm

from accord.modalities import COUNTERFACTUAL, MEDIA
from accord.shards.dedupe import Duplicate, duplicates_in_order
from accord.shards.staging import STAGING, block_path, private_tmp, shard_path
from accord.shards.tario import member_key, tar_end

PACK_COMPLETE = "pack/complete"  # every shard's list is written (its content: the number of shards)


def planned_shards(fs: fsspec.AbstractFileSystem, staging: str) -> int | None:
    """The number of shards once :func:`plan_shards` has finished, else None."""
    try:
        with fs.open(f"{staging}/{PACK_COMPLETE}") as f:
            return int(json.load(f)["shards"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


class JsonlWriter:
    """Rows appended to ``path`` as they come, under a temporary name until ``close()``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        self.file = fs.open(f"{path}.tmp", "w")
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        self.file.close()
        self.fs.mv(f"{self.path}.tmp", self.path)


def plan_shards(
    fs: fsspec.AbstractFileSystem,
    out: str,
    staging: str,
    n_blocks: int,
    prefix: str,
    samples_per_shard: int,
    max_shard_bytes: int | None,
    dedupe_partitions: int | None,
    progress: bool = False,
) -> dict[str, Any]:
    """Assign every kept sample of the ``n_blocks`` committed blocks to a shard (lists in staging), dropping the
    duplicates of the ``dedupe_partitions`` reduced partitions (None: no dedupe); write ``failures.jsonl`` (block
    order: input order unless shuffled) and ``duplicates.jsonl``; return the pack's figures with ``sizes`` (shard
    name -> samples)."""
    found: Iterator[Duplicate] = iter(())
    if dedupe_partitions is not None:
        found = duplicates_in_order(fs, staging, dedupe_partitions)
    dup = next(found, None)
    failures = JsonlWriter(fs, f"{out}/failures.jsonl")
    duplicates = JsonlWriter(fs, f"{out}/duplicates.jsonl")
    reasons: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    pairs = total_bytes = 0  # pairs: samples written with a counterfactual pair
    runs: list[list[Any]] = []  # the open shard's [block, offset, [keys], [sizes]]: samples adjacent in the block
    count = nbytes = 0  # the open shard's samples and bytes

    def close() -> None:
        nonlocal runs, count, nbytes, total_bytes
        if count:
            shard = len(sizes)
            name = f"{prefix}-{shard:06d}.tar"
            path = shard_path(staging, shard, "json")
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(f"{path}.tmp", "w") as f:
                json.dump({"name": name, "runs": runs, "samples": count, "bytes": nbytes}, f)
            fs.mv(f"{path}.tmp", path)
            sizes[name] = count
            total_bytes += nbytes
        runs, count, nbytes = [], 0, 0

    for block in tqdm(range(n_blocks), desc="plan shards", unit="block", disable=not progress):
        with fs.open(block_path(staging, block, "json")) as f:
            info = json.load(f)
        offset = 0  # of the sample in the block's tar (its samples are there in record order)
        adjacent = False  # whether the open run ends just before this sample
        for row in info["failures"]:
            failures.write(row)
            reasons[row["reason"].split(":")[0]] += 1
        for rec in info["samples"]:
            key = rec["key"]
            size = rec["bytes"]
            if dup is not None and (dup.block, dup.key) == (block, key):
                duplicates.write(
                    {"index": rec["index"], "key": key, "origin": rec["origin"], "duplicate_of": dup.duplicate_of}
                )
                dup = next(found, None)
                offset += size
                adjacent = False
                continue
            if count and (
                count >= samples_per_shard or (max_shard_bytes is not None and nbytes + size > max_shard_bytes)
            ):
                close()
            if not (runs and adjacent):
                runs.append([block, offset, [], []])
            runs[-1][2].append(key)
            runs[-1][3].append(size)
            offset += size
            adjacent = True
            count += 1
            nbytes += size
            modalities.update(rec["modalities"])
            pairs += bool(rec.get(COUNTERFACTUAL))
    close()
    failures.close()
    duplicates.close()
    fs.makedirs(f"{staging}/pack", exist_ok=True)
    with fs.open(f"{staging}/{PACK_COMPLETE}", "w") as f:
        json.dump({"shards": len(sizes)}, f)
    return {
        "written": sum(sizes.values()),
        "rejected": failures.count,
        "duplicates": duplicates.count,
        "shards": len(sizes),
        "bytes": total_bytes,
        "modalities": {m: modalities.get(m, 0) for m in MEDIA},
        "counterfactuals": pairs,
        "reasons": dict(reasons.most_common()),
        "sizes": sizes,
    }


def write_shard(task: tuple[str, int]) -> tuple[int, int]:
    """Write final shard ``shard`` of the build whose output folder is ``output`` (an fsspec URL) from its list in
    staging; returns (shard, samples). Its samples' tar records are copied from the block tars as they are (each
    sample's first header checked to name it), then the tar's end as :mod:`tarfile` writes it: the bytes a
    :class:`~accord.shards.tario.TarWriter` would write, without parsing or re-encoding a header."""
    output, shard = task
    fs, out = fsspec.core.url_to_fs(output)
    staging = f"{out}/{STAGING}"
    with fs.open(shard_path(staging, shard, "json")) as f:
        plan = json.load(f)
    path = f"{out}/{plan['name']}"
    tmp = private_tmp(path)  # a shard taken over may be written twice
    count = written = 0
    with fs.open(tmp, "wb") as dst:
        for block, offset, keys, sizes in plan["runs"]:
            with fs.open(block_path(staging, block, "tar"), "rb") as src:
                src.seek(offset)
                for key, size in zip(keys, sizes, strict=True):
                    data = src.read(size)
                    if len(data) != size or member_key(data) != key:
                        raise RuntimeError(
                            f"{plan['name']}: block {block}'s tar does not hold {key} where its record says"
                        )
                    dst.write(data)
                    count += 1
                    written += size
        dst.write(tar_end(written))
    if count != plan["samples"] or written != plan["bytes"]:
        fs.rm(tmp)
        raise RuntimeError(f"{plan['name']}: wrote {count} samples ({written} B), planned {plan}")
    fs.mv(tmp, path)
    with fs.open(shard_path(staging, shard, "done"), "w") as f:
        f.write(f"{count}\n")
    return shard, count
