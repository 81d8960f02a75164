"""A build's plan on bounded memory: the inputs counted and fingerprinted, then cut into blocks on disk.

Two streaming passes over the inputs (:func:`~accord.shards.sources.iter_sources`), so that nothing but the current
row batch is held whatever the manifest's size:

1. :func:`survey` counts the inputs and hashes their listing: the count fixes the block size (:func:`block_size`)
   and the hash lets a resumed build or another node check that it reads the same inputs.
2. :func:`write_block_inputs` writes each block's inputs to ``block-N.inputs.jsonl`` in staging; workers read their
   block from there, and no process ever holds the whole input list. With a shuffle seed the order is an external
   Rao-Sandelius shuffle: each input goes to one of up to :data:`MAX_BUCKETS` local bucket files drawn at random,
   each bucket is permuted in memory and the buckets are concatenated. That is a uniformly random permutation,
   determined by the seed alone, holding one bucket (``inputs / MAX_BUCKETS`` rows, or :data:`BUCKET_ROWS`) at a
   time.

On a build over several nodes (:func:`stage_inputs`) node 0 writes the blocks' inputs while touching a heartbeat
file; the other nodes wait for ``inputs-complete``, and write them themselves (the same bytes) when the heartbeat
goes stale: a dead node 0 never stalls the build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
from tqdm import tqdm

from accord.shards.claims import heartbeat, stale_heartbeat
from accord.shards.sources import SampleSource, iter_sources
from accord.shards.staging import block_folder, block_path, private_tag

PLAN_VERSION = 3  # 3: shard lists hold byte ranges of the block tars (a staging folder of 2 cannot be resumed)
MAX_BLOCKS = 100_000  # blocks grow beyond 256 inputs so that 100M inputs make 100k blocks, not 400k
BUCKET_ROWS = 16_384  # inputs per shuffle bucket, until there are MAX_BUCKETS of them
MAX_BUCKETS = 512  # open bucket files while shuffling
COMPLETE = "inputs-complete"
HEARTBEAT = "inputs-planner"


def block_size(n_inputs: int) -> int:
    """Inputs per block: 1/64 of them up to 256 (parallel work for small builds), then as many as keep the blocks
    at :data:`MAX_BLOCKS`. Depends on the input count only, so every node and every resume cuts the same blocks."""
    return max(1, min(256, math.ceil(n_inputs / 64)), math.ceil(n_inputs / MAX_BLOCKS))


def block_count(n_inputs: int, size: int) -> int:
    return math.ceil(n_inputs / size)


def block_inputs(n_inputs: int, size: int, block: int) -> int:
    """How many inputs block ``block`` holds (the last one may hold fewer)."""
    return min(size, n_inputs - block * size)


def source_line(src: SampleSource) -> str:
    """One input as a line of JSON (what the digest hashes and a block's inputs file holds)."""
    return json.dumps(dataclasses.asdict(src), sort_keys=True, default=str)


@dataclass(frozen=True)
class Survey:
    inputs: int
    digest: str  # sha256 of the inputs' lines, in input order


def survey(src: str, text_column: str, progress: bool = False) -> Survey:
    """Count and hash the inputs of ``src`` in one streaming pass; raises the inputs' errors (bad manifest)."""
    h = hashlib.sha256()
    n = 0
    for s in tqdm(iter_sources(src, text_column), desc="read inputs", unit="input", disable=not progress):
        h.update(source_line(s).encode())
        h.update(b"\n")
        n += 1
    return Survey(n, h.hexdigest())


def read_block_inputs(fs: fsspec.AbstractFileSystem, staging: str, block: int) -> list[SampleSource]:
    """The inputs of one block, as :func:`write_block_inputs` wrote them."""
    with fs.open(block_path(staging, block, "inputs.jsonl"), "r", encoding="utf-8") as f:
        return [SampleSource(**json.loads(line)) for line in f]


class _BlockInputsWriter:
    """Cuts a stream of input lines into blocks of ``size``, each written under a temporary name and renamed."""

    def __init__(self, fs: fsspec.AbstractFileSystem, staging: str, size: int):
        self.fs, self.staging, self.size = fs, staging, size
        self.tag = private_tag()  # several planners may write the same block at once
        self.block, self.count = 0, 0
        self.file: IO[str] | None = None
        self.folder: str | None = None

    def add(self, line: str) -> None:
        if self.file is None:
            folder = block_folder(self.staging, self.block)
            if folder != self.folder:
                self.fs.makedirs(folder, exist_ok=True)
                self.folder = folder
            self.file = self.fs.open(f"{block_path(self.staging, self.block, 'inputs.jsonl')}.{self.tag}", "w")
        self.file.write(line if line.endswith("\n") else line + "\n")
        self.count += 1
        if self.count == self.size:
            self.close()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        path = block_path(self.staging, self.block, "inputs.jsonl")
        self.fs.mv(f"{path}.{self.tag}", path)
        self.file, self.block, self.count = None, self.block + 1, 0


def shuffled_lines(lines: Iterable[str], n: int, seed: int) -> Iterator[str]:
    """``lines`` (``n`` of them) in a random order fixed by ``seed``: an external Rao-Sandelius shuffle through local
    bucket files, holding one bucket in memory."""
    k = min(MAX_BUCKETS, max(1, math.ceil(n / BUCKET_ROWS)))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="accord-shuffle-") as tmp, contextlib.ExitStack() as stack:
        buckets = [stack.enter_context(open(f"{tmp}/{b}.jsonl", "w", encoding="utf-8")) for b in range(k)]
        for line in lines:
            buckets[rng.randrange(k)].write(line + "\n")
        stack.close()
        for b in range(k):
            with open(f"{tmp}/{b}.jsonl", encoding="utf-8") as f:
                rows = f.readlines()
            os.remove(f"{tmp}/{b}.jsonl")
            random.Random(f"accord-shuffle:{seed}:{b}").shuffle(rows)
            yield from rows


def write_block_inputs(
    fs: fsspec.AbstractFileSystem,
    staging: str,
    src: str,
    text_column: str,
    n_inputs: int,
    shuffle_seed: int | None,
    progress: bool = False,
) -> None:
    """Write every block's inputs file (block size from ``n_inputs``, order shuffled by ``shuffle_seed``), then the
    ``inputs-complete`` marker."""
    lines: Iterable[str] = (source_line(s) for s in iter_sources(src, text_column))
    lines = tqdm(lines, total=n_inputs, desc="plan blocks", unit="input", disable=not progress)
    if shuffle_seed is not None:
        lines = shuffled_lines(lines, n_inputs, shuffle_seed)
    writer = _BlockInputsWriter(fs, staging, block_size(n_inputs))
    written = 0
    for line in lines:
        writer.add(line)
        written += 1
    writer.close()
    if written != n_inputs:
        raise RuntimeError(f"--input changed while the build was planned: {n_inputs} inputs, then {written}")
    with fs.open(f"{staging}/{COMPLETE}", "w") as f:
        f.write(f"{n_inputs}\n")


def stage_inputs(
    fs: fsspec.AbstractFileSystem,
    staging: str,
    src: str,
    text_column: str,
    n_inputs: int,
    shuffle_seed: int | None,
    node_rank: int,
    num_nodes: int,
    timeout_s: float,
    progress: bool = False,
) -> None:
    """Make sure every block's inputs are in staging: already there (a resumed build), written here (node 0, or any
    node when the planner's heartbeat is older than ``timeout_s``), or written by node 0 while this node waits."""
    marker, beat = f"{staging}/{COMPLETE}", f"{staging}/{HEARTBEAT}"
    waited = time.time()
    bar = None
    while not fs.exists(marker):
        if node_rank == 0 or stale_heartbeat(beat, waited, timeout_s):
            if bar is not None:
                bar.close()
            with heartbeat(beat if num_nodes > 1 else None, timeout_s):
                write_block_inputs(fs, staging, src, text_column, n_inputs, shuffle_seed, progress)
            return
        if bar is None:
            bar = tqdm(
                desc="waiting for node 0 to plan the blocks", disable=not progress, bar_format="{desc} {elapsed}"
            )
        time.sleep(min(1.0, timeout_s / 4))
        fs.invalidate_cache(staging)
    if bar is not None:
        bar.close()
