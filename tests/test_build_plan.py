"""Shard builder at scale: streamed manifests on bounded memory, block inputs in staging, the external shuffle,
fanned-out staging folders, a planner that no dead node 0 can stall, and dedupe partitioned by hash."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import fsspec
import pytest

from accord.shards import dedupe, plan, staging
from accord.shards.build import BuildConfig, build
from accord.shards.plan import block_size, read_block_inputs, shuffled_lines, stage_inputs, survey
from accord.shards.sources import iter_sources

from helpers.media import write_image

CAPTION = "a long caption that makes each row of the manifest weigh several hundred bytes " * 16


def rows(n: int) -> list[dict]:
    return [{"image": f"img/{i % 7}.png", "text": f"{i} {CAPTION}", "score": i / 3} for i in range(n)]


def write_jsonl(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for row in rows(n):
            f.write(json.dumps(row) + "\n")
    return path


def write_csv(path: Path, n: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "text", "score"])
        w.writeheader()
        w.writerows(rows(n))
    return path


def plan_peak(manifest: Path, out: Path, shuffle_seed: int | None = None) -> int:
    """Peak Python memory (bytes) of surveying ``manifest`` and writing its blocks' inputs."""
    fs = fsspec.filesystem("file")
    tracemalloc.start()
    try:
        n = survey(str(manifest), "text").inputs
        plan.write_block_inputs(fs, str(out), str(manifest), "text", n, shuffle_seed)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_planning_a_manifest_never_holds_it(tmp_path: Path, monkeypatch, fmt: str) -> None:
    """A 20 MB manifest planned within 4 MB of Python memory (the old builder held every row, several times over),
    with and without the shuffle (whose buckets are made small here, as they are relative to a 100M-row input)."""
    manifest = (write_jsonl if fmt == "jsonl" else write_csv)(tmp_path / f"m.{fmt}", 15_000)
    assert manifest.stat().st_size > 19e6
    assert plan_peak(manifest, tmp_path / "plain") < 4e6
    monkeypatch.setattr(plan, "BUCKET_ROWS", 1024)
    assert plan_peak(manifest, tmp_path / "shuffled", shuffle_seed=3) < 4e6
    n_blocks = -(-15_000 // block_size(15_000))
    inputs = [read_block_inputs(fsspec.filesystem("file"), str(tmp_path / "shuffled"), b) for b in range(n_blocks)]
    assert sorted(s.index for block in inputs for s in block) == list(range(15_000))


@pytest.mark.slow  # a process of its own
def test_planning_a_parquet_manifest_reads_it_in_row_batches(tmp_path: Path) -> None:
    """In a process of its own (Arrow's allocator keeps a peak per process): a 20 MB parquet manifest of many row
    groups is planned with Arrow's peak allocation and Python's peak each a fraction of the file."""
    script = f"""
import sys, tracemalloc
import fsspec, pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_build_plan import rows
from accord.shards import plan
rows_ = rows(15_000)
with pq.ParquetWriter("{tmp_path}/m.parquet", pa.schema([("image", pa.string()), ("text", pa.string()),
                      ("score", pa.float64())])) as w:
    for i in range(0, len(rows_), 500):
        w.write_table(pa.Table.from_pylist(rows_[i:i + 500]))
del rows_
before = pa.default_memory_pool().max_memory()
tracemalloc.start()
n = plan.survey("{tmp_path}/m.parquet", "text").inputs
plan.write_block_inputs(fsspec.filesystem("file"), "{tmp_path}/out", "{tmp_path}/m.parquet", "text", n, None)
print(n, before, pa.default_memory_pool().max_memory(), tracemalloc.get_traced_memory()[1])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n, before, arrow_peak, python_peak = map(int, proc.stdout.split())
    size = (tmp_path / "m.parquet").stat().st_size
    assert n == 15_000 and size > 1e6  # compressed: the captions alone decode to 20 MB
    assert arrow_peak < 6e6 and python_peak < 4e6, (before, arrow_peak, python_peak)


def test_several_manifests_read_as_one(tmp_path: Path) -> None:
    """Braces and globs name several manifests (of any format), read in sorted order with indices running on."""
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a-0.jsonl", 5)
    write_csv(tmp_path / "parts" / "a-1.csv", 3)
    write_jsonl(tmp_path / "parts" / "a-2.jsonl", 4)
    globbed = list(iter_sources(str(tmp_path / "parts" / "a-*")))
    braced = list(iter_sources(str(tmp_path / "parts" / "a-{0..2}.*")))
    listed = list(iter_sources(str(tmp_path / "parts" / "{a-0.jsonl,a-1.csv,a-2.jsonl}")))
    assert [s.index for s in globbed] == list(range(12))
    assert [s.origin for s in globbed][4:6] == ["a-0.jsonl:row 5", "a-1.csv:row 1"]
    assert [s.text for s in globbed] == [s.text for s in listed] == [s.text for s in braced]
    assert globbed[5].media["image"].endswith("parts/img/0.png")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(iter_sources(str(tmp_path / "parts" / "b-*.jsonl")))
    with pytest.raises(FileNotFoundError, match="a-7.jsonl' does not exist"):
        iter_sources(str(tmp_path / "parts" / "a-{0,7}.jsonl"))


def test_shuffle_is_a_uniform_permutation_fixed_by_the_seed(monkeypatch) -> None:
    """Across buckets (20 lines, 5 buckets) every line is equally likely at every position; a seed gives one
    order."""
    monkeypatch.setattr(plan, "BUCKET_ROWS", 4)
    lines = [str(i) for i in range(20)]
    orders = [[int(x) for x in shuffled_lines(lines, 20, seed)] for seed in range(4000)]
    assert all(sorted(o) == list(range(20)) for o in orders)
    assert orders[7] == [int(x) for x in shuffled_lines(lines, 20, 7)] != orders[8]
    for position in (0, 9, 19):
        counts = [sum(o[position] == i for o in orders) for i in range(20)]
        assert min(counts) > 140 and max(counts) < 260, (position, counts)  # 200 expected, sd 14


def test_block_size_grows_with_the_input() -> None:
    assert [block_size(n) for n in (0, 1, 64, 65, 10_000, 16_384, 25_600_000)] == [1, 1, 1, 2, 157, 256, 256]
    assert block_size(100_000_000) == 1000 and -(-100_000_000 // block_size(100_000_000)) == plan.MAX_BLOCKS


def test_staging_fans_out_and_the_output_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    """40 one-input blocks over folders of 4 blocks: the same shards as one folder would give."""
    (tmp_path / "img").mkdir()
    for i in range(7):
        write_image(tmp_path / "img" / f"{i}.png", "png", seed=i, size=(24, 16))
    manifest = write_jsonl(tmp_path / "m.jsonl", 40)
    opts = dict(input=str(manifest), samples_per_shard=6, shuffle_seed=1, progress=False, keep_staging=True)
    build(BuildConfig(output=str(tmp_path / "one"), **opts))
    monkeypatch.setattr(staging, "BLOCKS_PER_FOLDER", 4)
    build(BuildConfig(output=str(tmp_path / "fanned"), **opts))
    folders = sorted(p.name for p in (tmp_path / "fanned" / "_staging" / "blocks").iterdir())
    assert folders == [f"{i:03d}" for i in range(10)]
    assert all(len(list((tmp_path / "fanned" / "_staging" / "blocks" / f).glob("*.json"))) == 4 for f in folders)
    for name in ("shard-000000.tar", "shard-000006.tar", "sizes.json", "failures.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "fanned" / name).read_bytes()


def test_a_node_plans_when_node_0_is_dead_and_waits_while_it_lives(tmp_path: Path) -> None:
    """Node 1 of 2 waits for node 0's plan while node 0's heartbeat is fresh, and plans itself once it is stale."""
    manifest = write_jsonl(tmp_path / "m.jsonl", 10)
    fs = fsspec.filesystem("file")
    args = (str(manifest), "text", 10, None)

    stale = tmp_path / "dead"
    stale.mkdir()
    t = time.time()
    stage_inputs(fs, str(stale), *args, node_rank=1, num_nodes=2, timeout_s=0.5)
    assert 0.5 <= time.time() - t < 5 and (stale / plan.COMPLETE).exists()
    assert [s.index for s in read_block_inputs(fs, str(stale), 0)] == [0]

    alive = tmp_path / "alive"
    alive.mkdir()
    stop = threading.Event()

    def node_0() -> None:  # beats for 1.5 s, then writes the plan
        deadline = time.time() + 1.5
        while time.time() < deadline:
            (alive / plan.HEARTBEAT).touch()
            time.sleep(0.05)
        if not stop.is_set():
            plan.write_block_inputs(fs, str(alive), *args)

    thread = threading.Thread(target=node_0)
    thread.start()
    time.sleep(0.1)
    t = time.time()
    stage_inputs(fs, str(alive), *args, node_rank=1, num_nodes=2, timeout_s=0.5)
    waited = time.time() - t
    stop.set()
    thread.join()
    assert waited >= 1.3 and (alive / plan.COMPLETE).exists()
    assert list((alive / "blocks" / "000").glob("*.tmp")) == []


@pytest.mark.parametrize(("partitions", "group_blocks"), [(1, 1000), (3, 4), (256, 1)])
def test_partitioned_dedupe_equals_one_dict_over_every_hash(
    tmp_path: Path, monkeypatch, partitions: int, group_blocks: int
) -> None:
    """Duplicates found by the map tasks (groups of blocks) and reduce tasks (partitions), run in any order, are
    exactly those of one pass with every hash in a dict, in the same (block) order."""
    monkeypatch.setattr(dedupe, "GROUP_BLOCKS", group_blocks)
    rng = random.Random(0)
    hashes = [hashlib.sha256(str(rng.randrange(60)).encode()).hexdigest() for _ in range(400)]
    fs = fsspec.filesystem("file")
    root = str(tmp_path / staging.STAGING)
    blocks = [hashes[i : i + 37] for i in range(0, 400, 37)]
    for b, block in enumerate(blocks):
        fs.makedirs(staging.block_folder(root, b), exist_ok=True)
        records = [{"key": f"{b:04d}{p:04d}", "hash": h} for p, h in enumerate(block)]
        Path(staging.block_path(root, b, "json")).write_text(json.dumps({"samples": records}))
    seen: dict[str, str] = {}
    expected = []
    for b, block in enumerate(blocks):
        for p, h in enumerate(block):
            key = f"{b:04d}{p:04d}"
            if h in seen:
                expected.append((b, p, key, seen[h]))
            else:
                seen[h] = key
    assert [dedupe.partitions(n) for n in (1, 100_000, 100_001, 10**8, 10**12)] == [1, 1, 2, 1000, 1024]
    n_groups = dedupe.groups(len(blocks))
    assert n_groups == -(-len(blocks) // group_blocks)
    for g in rng.sample(range(n_groups), n_groups):
        assert dedupe.map_group(dedupe.map_task(str(tmp_path), g, len(blocks), partitions))[0] == g
    counts = [dedupe.reduce_partition((str(tmp_path), p, n_groups)) for p in rng.sample(range(partitions), partitions)]
    got = list(dedupe.duplicates_in_order(fs, root, partitions))
    assert sum(c for _, c in counts) == len(got)
    assert got == expected and len(got) == 400 - len(set(hashes)) > 300


def test_a_directory_is_streamed_folder_by_folder_in_the_order_of_one_sorted_listing(tmp_path: Path, monkeypatch):
    """A directory input yields its samples in the sorted order of every stem of the tree (a subfolder ``d`` sorts
    as ``d/``, between ``d-x`` and ``d0``), listing one folder at a time: the first sample comes before the later
    folders are listed."""
    files = [
        "a.png", "a.txt", "a-b.png", "a-b.txt", "a0.png", "a0.txt", "a/x.png", "a/x.txt", "a/sub/y.png",
        "a/sub/y.txt", "a/z.png", "a/z.txt", "b/c/d.png", "b/c/d.txt", "b/c/d.counterfactual.png",
        "b/c/d.counterfactual.txt", "b/orphan.counterfactual.png", ".hidden/h.png", "_DSC1.png", "_DSC1.txt",
        "z/empty/.DS_Store", "notes",
    ]  # fmt: skip
    for rel in files:
        path = tmp_path / "tree" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            write_image(path, "png")
        else:
            path.write_text(f"caption of {rel}")
    stems: set[str] = set()
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        dot = name.rfind(".")
        stem = rel[: len(rel) - len(name) + dot] if dot > 0 else rel
        stems.add(stem)
    stems -= {"b/c/d.counterfactual"}  # d's pair, not an input of its own
    got = list(iter_sources(str(tmp_path / "tree")))
    assert [s.origin for s in got] == sorted(stems) and [s.index for s in got] == list(range(len(stems)))
    by = {s.origin: s for s in got}
    assert by["b/c/d"].error is None and by["b/c/d"].counterfactual_text == "caption of b/c/d.counterfactual.txt"
    assert "counterfactual of no sample" in by["b/orphan.counterfactual"].error
    assert "hidden" in by[".hidden/h"].error and "hidden" in by["z/empty/.DS_Store"].error
    assert by["a/sub/y"].error is None and "unsupported file type" in by["notes"].error

    listed: list[str] = []
    ls = fsspec.implementations.local.LocalFileSystem.ls
    monkeypatch.setattr(
        fsspec.implementations.local.LocalFileSystem,
        "ls",
        lambda self, path, detail=True, **kw: listed.append(path.rstrip("/")) or ls(self, path, detail, **kw),
    )
    first = next(iter_sources(str(tmp_path / "tree")))
    assert first.origin == ".hidden/h" and [p.rsplit("tree", 1)[-1] for p in listed] == ["", "/.hidden"]


def test_processes_writing_one_json_at_once_each_rename_a_whole_file(tmp_path: Path) -> None:
    """Nodes started together each write the build's ``plan.json``; a shared temporary name made one node's rename
    fail (CI: ``plan.json.tmp: No such file or directory``). 8 writers x 25 writes of one path at once, none fails and
    the file is always one writer's whole JSON."""
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "plan.json")
    barrier, errors = threading.Barrier(8), []

    def write(i: int) -> None:
        barrier.wait()
        for j in range(25):
            try:
                staging.write_json(fs, path, {"writer": i, "write": j, "pad": "x" * 4096})
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(json.loads(Path(path).read_text())["pad"]) == 4096
    assert list(tmp_path.iterdir()) == [Path(path)]
