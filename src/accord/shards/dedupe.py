"""Exact duplicates of a build, found in a pass of their own over the blocks' recorded hashes: a map-reduce whose
tasks are claimed like blocks (by every node's worker pool, or as Ray tasks), partitioned by hash so that no process
holds every hash and no node does the pass alone.

1. :func:`map_group`, one task per group of :data:`GROUP_BLOCKS` blocks: reads the group's commit records and writes
   each sample's ``hash block position key`` to the file of its hash's partition (:func:`partitions` of them), in
   block order. It holds the group's lines: about 140 MB at 100M inputs (1,000 blocks of 1,000).
2. :func:`reduce_partition`, one task per partition once every group is mapped: reads the partition's files in group
   order (so in block order) with only that partition's hashes in memory, and writes its duplicates, in block order.
3. :func:`duplicates_in_order`, in the shard planner: merges the partitions' duplicates back into block order.

The first occurrence in block order is kept; every later sample of the same hash is a duplicate of it: the same
decisions, in the same order, as one dict over every hash (tested), whatever the number of partitions, groups,
workers or nodes. Files are written under temporary names and renamed, so a task taken over from a slow node (or
retried by Ray) rewrites the same bytes.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterator
from typing import NamedTuple

import fsspec

from accord.shards.staging import BLOCKS_PER_FOLDER, STAGING, block_path, hashes_path, private_tmp, unit_path

GROUP_BLOCKS = BLOCKS_PER_FOLDER  # blocks per map task: at 100M inputs, 100 groups
PARTITION_SAMPLES = 100_000  # samples per partition aimed at: a reduce task holds about this many hashes
MAX_PARTITIONS = 1024


class Duplicate(NamedTuple):
    block: int
    position: int  # the sample's place among its block's written samples
    key: str
    duplicate_of: str  # the key of the first sample with its hash


def partitions(n_inputs: int) -> int:
    """Hash partitions of a build of ``n_inputs``: about :data:`PARTITION_SAMPLES` samples each, at most
    :data:`MAX_PARTITIONS` (1,000 at 100M inputs)."""
    return max(1, min(MAX_PARTITIONS, math.ceil(n_inputs / PARTITION_SAMPLES)))


def groups(n_blocks: int) -> int:
    """Map tasks of a build of ``n_blocks`` blocks."""
    return max(1, math.ceil(n_blocks / GROUP_BLOCKS))


def map_task(output: str, group: int, n_blocks: int, n_partitions: int) -> tuple[str, int, range, int]:
    """The task of map ``group``: its blocks named, so that the task means the same in any process."""
    return output, group, range(group * GROUP_BLOCKS, min(n_blocks, (group + 1) * GROUP_BLOCKS)), n_partitions


def map_group(task: tuple[str, int, range, int]) -> tuple[int, int]:
    """Map task ``(output, group, blocks, n_partitions)`` (:func:`map_task`): the group's samples' hashes into the
    files of their partitions (only partitions that get a sample have a file); returns (group, samples)."""
    output, group, blocks, n_partitions = task
    fs, out = fsspec.core.url_to_fs(output)
    staging = f"{out}/{STAGING}"
    lines: dict[int, list[str]] = {}
    samples = 0
    for block in blocks:
        with fs.open(block_path(staging, block, "json")) as f:
            records = json.load(f)["samples"]
        for position, rec in enumerate(records):
            digest = rec["hash"]
            lines.setdefault(int(digest[:8], 16) % n_partitions, []).append(
                f"{digest} {block} {position} {rec['key']}\n"
            )
        samples += len(records)
    for partition, rows in lines.items():
        path = hashes_path(staging, partition, group)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = private_tmp(path)
        with fs.open(tmp, "w") as f:
            f.writelines(rows)
        fs.mv(tmp, path)
    done = unit_path(staging, "group", group, "done")
    fs.makedirs(done.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(done, "w") as f:
        f.write(f"{samples}\n")
    return group, samples


def reduce_partition(task: tuple[str, int, int]) -> tuple[int, int]:
    """Reduce task ``(output, partition, n_groups)``, once every group is mapped: the partition's duplicates, in
    block order, to ``partition-P.dup``; returns (partition, duplicates)."""
    output, partition, n_groups = task
    fs, out = fsspec.core.url_to_fs(output)
    staging = f"{out}/{STAGING}"
    first: dict[str, str] = {}
    found = 0
    path = unit_path(staging, "partition", partition, "dup")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = private_tmp(path)
    with fs.open(tmp, "w", encoding="utf-8") as dup:
        for group in range(n_groups):
            try:
                f = fs.open(hashes_path(staging, partition, group), "r", encoding="utf-8")
            except FileNotFoundError:  # no sample of this group fell in this partition
                continue
            with f:
                for line in f:
                    digest, block, position, key = line.split()
                    if digest in first:
                        dup.write(f"{block} {position} {key} {first[digest]}\n")
                        found += 1
                    else:
                        first[digest] = key
    fs.mv(tmp, path)
    return partition, found


def duplicates_in_order(fs: fsspec.AbstractFileSystem, staging: str, n_partitions: int) -> Iterator[Duplicate]:
    """Every duplicate of the build, in block order, once every partition is reduced."""
    files = [fs.open(unit_path(staging, "partition", p, "dup"), "r", encoding="utf-8") for p in range(n_partitions)]
    try:
        yield from heapq.merge(*(map(_duplicate, f) for f in files))
    finally:
        for f in files:
            f.close()


def _duplicate(line: str) -> Duplicate:
    block, position, key, of = line.split()
    return Duplicate(int(block), int(position), key, of)
