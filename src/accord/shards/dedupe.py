"""Exact duplicates of a build, found in a pass of their own over the blocks' recorded hashes, partitioned by hash
so that memory holds one partition (``samples / PARTITIONS`` hashes), never every hash of the build.

The first occurrence in block order is kept; every later sample of the same hash is a duplicate of it. The pass
writes each sample's ``hash block position key`` to the partition of its hash (local temporary files, in block order),
finds the duplicates of each partition with that partition's hashes in memory, and merges the partitions' duplicates
back into block order for the pack: the same decisions as one dict over every hash, in the same order.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import fsspec

from accord.shards.staging import block_path

PARTITIONS = 256


class Duplicate(NamedTuple):
    block: int
    position: int  # the sample's place among its block's written samples
    key: str
    duplicate_of: str  # the key of the first sample with its hash


def duplicates_in_order(fs: fsspec.AbstractFileSystem, staging: str, n_blocks: int) -> Iterator[Duplicate]:
    """Every duplicate among the committed blocks' samples (``block-N.json`` records), in block order."""
    with tempfile.TemporaryDirectory(prefix="accord-dedupe-") as tmp:
        parts = [open(f"{tmp}/{p}.in", "w", encoding="utf-8") for p in range(PARTITIONS)]
        try:
            for block in range(n_blocks):
                with fs.open(block_path(staging, block, "json")) as f:
                    records = json.load(f)["samples"]
                for position, rec in enumerate(records):
                    parts[int(rec["hash"][:8], 16) % PARTITIONS].write(
                        f"{rec['hash']} {block} {position} {rec['key']}\n"
                    )
        finally:
            for f in parts:
                f.close()
        for p in range(PARTITIONS):
            _partition_duplicates(f"{tmp}/{p}.in", f"{tmp}/{p}.dup")
        files = [open(f"{tmp}/{p}.dup", encoding="utf-8") for p in range(PARTITIONS)]
        try:
            yield from heapq.merge(*(map(_duplicate, f) for f in files))
        finally:
            for f in files:
                f.close()


def _partition_duplicates(src: str, dst: str) -> None:
    """One partition's duplicates, in block order (its lines come in block order)."""
    first: dict[str, str] = {}
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            digest, block, position, key = line.split()
            if digest in first:
                out.write(f"{block} {position} {key} {first[digest]}\n")
            else:
                first[digest] = key
    os.remove(src)


def _duplicate(line: str) -> Duplicate:
    block, position, key, of = line.split()
    return Duplicate(int(block), int(position), key, of)
