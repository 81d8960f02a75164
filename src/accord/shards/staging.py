"""Where a shard build keeps its work in progress: the layout of ``OUT/_staging``.

``plan.json`` (the options and inputs the build was started with), ``inputs-complete`` (the blocks' inputs are all
written), ``nodes/node-R.jsonl`` (each node's progress log) and, per block N, in a folder of
:data:`BLOCKS_PER_FOLDER` blocks (``blocks/NNN/``, so that no folder holds more than a few thousand files at 100M
inputs): ``block-N.inputs.jsonl`` (its inputs, one :class:`~accord.shards.sources.SampleSource` per line),
``block-N.tar`` and ``block-N.json`` (its converted samples and commit record) and, on a shared-folder build,
``block-N.claim`` (the node converting it); per final shard N, ``pack/NNN/shard-N.json`` (the samples it takes from
which blocks), ``shard-N.done`` once written and ``shard-N.claim`` (the node writing it); ``pack/complete`` once
every shard's list is written. With ``--dedupe`` (:mod:`accord.shards.dedupe`): per group of
:data:`BLOCKS_PER_FOLDER` blocks, ``dedupe/hashes/PPPP/group-G.txt`` (its samples' hashes in partition P) and
``dedupe/NNN/group-G.done``; per partition P, ``dedupe/NNN/partition-P.dup`` (its duplicates); claims beside them.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec

STAGING = "_staging"
BLOCKS_PER_FOLDER = 1000
# what a build hands out to workers and nodes: its folder in staging, and the suffix of the file that marks one done
UNITS = {
    "block": ("blocks", "json"),
    "shard": ("pack", "done"),
    "group": ("dedupe", "done"),  # dedupe's map tasks: a group of blocks' hashes split by partition
    "partition": ("dedupe", "dup"),  # dedupe's reduce tasks: one partition's duplicates
}


def unit_path(staging: str, kind: str, n: int, suffix: str) -> str:
    """``staging/FOLDER/NNN/KIND-NNNNNN.SUFFIX``: a file of block or shard ``n`` (:data:`UNITS`)."""
    return f"{staging}/{UNITS[kind][0]}/{n // BLOCKS_PER_FOLDER:03d}/{kind}-{n:06d}.{suffix}"


def done_glob(staging: str, kind: str) -> str:
    """A glob of the files marking each block (its commit record) or shard (written) done."""
    return f"{staging}/{UNITS[kind][0]}/*/{kind}-*.{UNITS[kind][1]}"


def unit_folder(staging: str, kind: str, n: int) -> str:
    """The folder of block or shard ``n``'s files."""
    return unit_path(staging, kind, n, "x").rsplit("/", 1)[0]


def block_folder(staging: str, block: int) -> str:
    return unit_folder(staging, "block", block)


def block_path(staging: str, block: int, suffix: str) -> str:
    """``staging/blocks/NNN/block-NNNNNN.{suffix}`` (suffix: ``inputs.jsonl``, ``tar``, ``json``, ``claim``)."""
    return unit_path(staging, "block", block, suffix)


def shard_path(staging: str, shard: int, suffix: str) -> str:
    """``staging/pack/NNN/shard-NNNNNN.{suffix}`` (``json``: its samples; ``done``: written; ``claim``)."""
    return unit_path(staging, "shard", shard, suffix)


def hashes_path(staging: str, partition: int, group: int) -> str:
    """``staging/dedupe/hashes/PPPP/group-NNNNNN.txt``: the hashes of block group ``group`` in ``partition``."""
    return f"{staging}/{UNITS['group'][0]}/hashes/{partition:04d}/group-{group:06d}.txt"


def private_tag() -> str:
    """A suffix no other process uses: files that several nodes may write at once (a block taken over from a node that
    was only slow, the plan of nodes started together) go through a temporary name of their own, then a rename."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def private_tmp(path: str) -> str:
    """``path`` under a temporary name of this process (:func:`private_tag`)."""
    return f"{path}.{private_tag()}"


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any, tmp: str | None = None) -> None:
    """Write ``obj`` to ``path`` atomically, through ``tmp`` (default :func:`private_tmp`): readers see the old file or
    the new one, and processes writing the same file at once (nodes started together write one ``plan.json``) each
    rename a whole file of their own."""
    tmp = tmp or private_tmp(path)
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    fs.mv(tmp, path)
