"""Build WebDataset shards from raw media + captions.

The build runs in two phases, which is what makes it reproducible, resumable and splittable across machines:

0. *Plan* (:mod:`accord.shards.plan`, streaming: memory does not grow with the inputs): the inputs are counted and
   hashed, then cut into fixed blocks (in a seeded random order with ``--shuffle-seed``) whose inputs are written to
   staging (:mod:`accord.shards.staging`).
1. *Process* (parallel over ``--workers`` processes and ``--num-nodes`` machines): each block is validated/converted
   and written to ``block-N.tar`` plus a ``block-N.json`` commit record (written last). A resumed build skips blocks
   whose record exists. Nodes claim blocks as they go and take over a dead node's (:mod:`accord.shards.claims`).
2. *Pack* (:mod:`accord.shards.pack`, no re-encoding): node 0 reads the blocks' commit records in order, drops
   exact duplicates (found beforehand by a map-reduce over the recorded hashes, partitioned by hash and run like the
   blocks, :mod:`accord.shards.dedupe`, so no process holds every hash), assigns samples to ``PREFIX-NNNNNN.tar`` by
   count and bytes and writes ``failures.jsonl`` and ``duplicates.jsonl``; then the shards are written in parallel
   (every node's worker pool, claimed like blocks, or Ray tasks), ``sizes.json`` and ``stats.json`` last, and the
   staging folder is removed.

Since every block's bytes depend only on its inputs and the options, the output is byte-identical whatever the
number of workers or nodes, and after any crash + ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import fsspec
from tqdm import tqdm

from accord.errors import command
from accord.modalities import COUNTERFACTUAL, IMAGE_FORMATS, MEDIA
from accord.shards.claims import BlockClaims, heartbeat, stale_heartbeat
from accord.shards.dedupe import groups, map_group, map_task, partitions, reduce_partition
from accord.shards.media import (
    RESIZE_MODES,
    AudioOptions,
    ImageOptions,
    MediaError,
    VideoOptions,
    decode_audio_track,
    ffmpeg_binary,
    process_audio,
    process_image,
    process_video,
    process_waveform,
)
from accord.shards.pack import plan_shards, planned_shards, write_shard
from accord.shards.plan import (
    PLAN_VERSION,
    block_count,
    block_inputs,
    block_size,
    read_block_inputs,
    stage_inputs,
    survey,
)
from accord.shards.sources import SampleSource
from accord.shards.staging import BLOCKS_PER_FOLDER, STAGING, block_path, private_tag, unit_folder, write_json
from accord.shards.tario import tar_size, write_tar

SHARD_PLANNER = "pack-planner"  # node 0's heartbeat while it plans the shards
T = TypeVar("T")
R = TypeVar("R")
Task = TypeVar("Task", bound=tuple)  # a unit's task: (where, unit, ...)


@dataclass
class BuildConfig:
    """One shard build (``accord build-shards``; each field is the flag of the same name)."""

    input: str
    """A manifest (.jsonl / .csv / .tsv / .parquet) or a directory of stem-grouped files; fsspec URLs too."""
    output: str
    """The output folder (local path or fsspec URL)."""
    prefix: str = "shard"
    """Shard file name prefix: ``PREFIX-000000.tar``."""
    samples_per_shard: int = 1000
    """Samples per shard (the last one may hold fewer)."""
    max_shard_bytes: int | None = None
    """Also close a shard before it would exceed this many bytes."""
    dedupe: Literal["none", "media", "sample"] = "none"
    """Drop exact duplicates by content hash of the media, or of media + caption."""
    shuffle_seed: int | None = None
    """Write the samples in a random order seeded by this."""
    text_column: str = "text"
    """The caption column of a manifest."""
    image: ImageOptions = field(default_factory=ImageOptions)
    video: VideoOptions = field(default_factory=VideoOptions)
    audio: AudioOptions = field(default_factory=AudioOptions)
    extract_audio: bool = False
    """Store a video's sound track as the sample's audio when it has none of its own."""
    sample_timeout_s: float = 300.0
    """Seconds one input may take to be read and converted (PIL, PyAV, ffmpeg); an input over it is rejected with
    that reason, so a file that hangs (a stalled mount, a decoder that loops) cannot hang its block. Enforced by
    SIGALRM in the thread converting it: a pool worker's, a Ray task's or the build's main thread (a Ray task runs on
    its worker's main thread); ``--video-timeout`` still bounds each ffmpeg run."""
    workers: int = 1
    """Processes converting inputs (the output is identical for any number); with ``distributor: ray``, the Ray
    cluster's CPUs instead."""
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    """What runs the blocks: this machine's process pool, or a Ray cluster (each block a task retried on failure
    and on a lost node; the output folder must be reachable from every Ray node: a shared folder or object store)."""
    ray_address: str | None = None
    """With ``distributor: ray``: the cluster to join (``auto``, ``ray://host:10001``, ...); default ``RAY_ADDRESS``,
    else a local Ray started for the build."""
    ray_retries: int = 3
    """With ``distributor: ray``: times a block's task is run again after it failed or its node was lost."""
    num_nodes: int = 1
    """Machines sharing the build over a shared output folder."""
    node_rank: int = 0
    """This machine's part of the build (0 plans the shards and writes the summary)."""
    claim_timeout_s: float = 300.0
    """With ``num_nodes``: seconds after which a block claimed by a node that stopped touching its claim (dead or
    hung) is taken over by another node."""
    resume: bool = False
    """Continue an interrupted build with the same options."""
    overwrite: bool = False
    """Delete a previous build in ``output`` first."""
    keep_staging: bool = False
    """Keep the staging folder of processed blocks after packing."""
    expect_workers: int | None = None
    """Warn when shards < expect_workers x expect_world_size (loader workers would idle)."""
    expect_world_size: int | None = None
    """See ``expect_workers``."""
    progress: bool = True
    """Progress bars and the closing summary."""

    def validate(self) -> None:
        def bad(option: str, why: str) -> None:
            raise ValueError(f"{option}: {why}")

        if self.samples_per_shard < 1:
            bad("--samples-per-shard", "must be >= 1")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1024:
            bad("--max-shard-bytes", "must be >= 1024")
        if self.dedupe not in ("none", "media", "sample"):
            bad("--dedupe", f"must be none, media or sample, not {self.dedupe!r}")
        if not 0 <= self.node_rank < self.num_nodes:
            bad("--node-rank", f"must be in [0, --num-nodes={self.num_nodes}), not {self.node_rank}")
        if self.num_nodes > 1 and "file" not in fsspec.core.url_to_fs(self.output)[0].protocol:
            bad("--num-nodes", f"needs --output on a shared POSIX folder (NFS, Lustre, local), not {self.output}")
        if self.claim_timeout_s <= 0:
            bad("--claim-timeout", "must be > 0 (seconds)")
        if self.workers < 1:
            bad("--workers", "must be >= 1")
        if self.distributor not in ("multiprocessing", "ray"):
            bad("--distributor", f"must be multiprocessing or ray, not {self.distributor!r}")
        if self.distributor == "ray":
            if self.num_nodes > 1:
                bad("--distributor", "ray spreads the blocks over its own cluster; drop --num-nodes")
            if self.ray_retries < 0:
                bad("--ray-retries", "must be >= 0")
            try:
                import ray  # noqa: F401
            except ImportError:
                bad("--distributor", "ray needs the ray package: pip install 'accord[ray]'")
        if self.resume and self.overwrite:
            bad("--resume", "cannot be combined with --overwrite")
        if self.image.resize_mode not in RESIZE_MODES:
            bad("--resize-mode", f"must be one of {RESIZE_MODES}")
        if self.image.format not in IMAGE_FORMATS:
            bad("--image-format", f"must be one of {IMAGE_FORMATS}")
        if self.image.size < 1:
            bad("--image-size", "must be >= 1")
        if not 1 <= self.image.quality <= 100:
            bad("--image-quality", "must be in [1, 100]")
        if "/" in self.prefix or not self.prefix:
            bad("--prefix", "must be a non-empty file name prefix without '/'")
        if self.video.timeout_s <= 0:
            bad("--video-timeout", "must be > 0 (seconds)")
        if self.sample_timeout_s <= 0:
            bad("--sample-timeout", "must be > 0 (seconds)")
        if self.video.mode == "transcode":
            ffmpeg_binary()  # fail now, not in every sample

    def output_options(self) -> dict[str, Any]:
        """Options that change the bytes written; a resumed build must use the same ones."""
        skip = {
            "input",
            "output",
            "workers",
            "distributor",
            "ray_address",
            "ray_retries",
            "num_nodes",
            "node_rank",
            "claim_timeout_s",
            "sample_timeout_s",
            "resume",
            "overwrite",
            "keep_staging",
            "expect_workers",
            "expect_world_size",
            "progress",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ------------------------------------------------------------------------------------------ phase 1: process
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def _convert(modality: str, url: str, cfg: BuildConfig, what: str = "") -> tuple[bytes, str, dict[str, Any], bytes]:
    """Read one medium and convert it as the build options say: (member bytes, member extension, its json info with
    the input's sha256, the input's bytes); ``what`` names it in the rejection ("counterfactual ")."""
    try:
        data = _read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):
        raise MediaError(f"{what}{modality} file not found: {url}") from None
    try:
        if modality == "image":
            out, ext, info = process_image(data, cfg.image)
        elif modality == "video":
            out, ext, info = process_video(data, url.rsplit(".", 1)[-1], cfg.video)
        else:
            out, ext, info = process_audio(data, cfg.audio)
    except MediaError as e:
        if not what:
            raise
        raise MediaError(f"{what}{e}") from None
    return out, ext, {**info, "sha256": _sha256(data)}, data


def process_sample(src: SampleSource, cfg: BuildConfig) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """Validate and convert one input into its shard members and its json; raises MediaError to reject it."""
    if src.error:
        raise MediaError(src.error)
    meta: dict[str, Any] = {
        **src.extra,
        "key": src.key,
        "origin": src.origin,
        "text": src.text,
        "source": dict(src.media),
    }
    members: list[tuple[str, bytes]] = []
    video_bytes = b""
    for modality in MEDIA:
        url = src.media.get(modality)
        if url is None:
            continue
        out, ext, meta[modality], data = _convert(modality, url, cfg)
        if modality == "video":
            video_bytes = data
        members.append((ext, out))
    if cfg.extract_audio and "video" in meta and "audio" not in meta and meta["video"].get("has_audio"):
        wav, rate = decode_audio_track(video_bytes)
        out, ext, info = process_waveform(wav, rate, cfg.audio)
        meta["audio"] = {**info, "sha256": meta["video"]["sha256"], "from": "video"}
        members.append((ext, out))
    if src.counterfactual:  # sources checked it: a caption, and media of the sample's own modalities
        pair: dict[str, Any] = {"text": src.counterfactual_text, "source": dict(src.counterfactual)}
        for modality in MEDIA:
            if modality in src.counterfactual:
                out, ext, pair[modality], _ = _convert(modality, src.counterfactual[modality], cfg, "counterfactual ")
                members.append((f"{COUNTERFACTUAL}.{ext}", out))
        members.append((f"{COUNTERFACTUAL}.txt", (src.counterfactual_text or "").encode("utf-8")))
        meta[COUNTERFACTUAL] = pair
    digests = [f"{m}:{meta[m]['sha256']}" for m in MEDIA if m in meta and "from" not in meta[m]]
    text = src.text or ""  # read_sources rejects inputs without a caption (src.error)
    if cfg.dedupe == "sample":
        digests.append(f"text:{_sha256(text.encode())}")
    members.append(("txt", text.encode("utf-8")))
    members.append(("json", json.dumps(meta, sort_keys=True, default=str).encode("utf-8")))
    record = {
        "key": src.key,
        "index": src.index,
        "origin": src.origin,
        "hash": _sha256("|".join(digests).encode()),
        "modalities": [m for m in MEDIA if m in meta],
        COUNTERFACTUAL: sorted(src.counterfactual),
    }
    return members, record


def _process_block(task: tuple[str, int, BuildConfig]) -> tuple[int, int, int]:
    """Worker: process one block (its inputs read from staging) into staging; returns (block, inputs, rejected)."""
    staging, block, cfg = task
    fs, root = fsspec.core.url_to_fs(staging)
    sources = read_block_inputs(fs, root, block)
    samples, records, failures = [], [], []
    for src in sources:
        try:
            with _time_limit(cfg.sample_timeout_s):
                members, record = process_sample(src, cfg)
        except (MediaError, SampleTimedOut) as e:
            reason = str(e) or f"took longer than --sample-timeout={cfg.sample_timeout_s:g} s to read and convert"
            failures.append(
                {"index": src.index, "key": src.key, "origin": src.origin, "reason": reason, "source": src.media}
            )
            continue
        except Exception as e:  # a bug or an unexpected library error must not kill the build either
            failures.append(
                {
                    "index": src.index,
                    "key": src.key,
                    "origin": src.origin,
                    "reason": f"unexpected error: {type(e).__name__}: {e}",
                    "source": src.media,
                }
            )
            continue
        samples.append((src.key, members))
        records.append({**record, "bytes": tar_size(members)})
    tmp = private_tag()  # a block taken over from a node that was only slow may be written twice, at once
    tar, commit = block_path(root, block, "tar"), block_path(root, block, "json")
    write_tar(fs, tar, samples, tmp=f"{tar}.{tmp}")
    write_json(fs, commit, {"block": block, "samples": records, "failures": failures}, tmp=f"{commit}.{tmp}")
    return block, len(sources), len(failures)


class SampleTimedOut(BaseException):
    """Raised by SIGALRM in the sample being converted (a BaseException, so no library's ``except Exception``
    swallows it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise SampleTimedOut


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SampleTimedOut` in the body after ``seconds`` (wall clock), even from a blocked read (PEP 475:
    the call is interrupted, not retried); no limit off the main thread, where no signal can be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _init_worker() -> None:
    """One thread per worker process. torch is imported only by the audio resampler, and reads OMP_NUM_THREADS when
    it is (``bench/build_scale.py --rows 10000``: importing it here made a 2-worker build 1.5 s slower, its tree 0.9 GB
    larger)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ output dir
def _finished(fs: fsspec.AbstractFileSystem, out: str) -> bool:
    return fs.exists(f"{out}/stats.json") and fs.exists(f"{out}/sizes.json")


def _remove_outputs(fs: fsspec.AbstractFileSystem, out: str, prefix: str) -> None:
    for path in fs.glob(f"{out}/{prefix}-*.tar*"):
        fs.rm(path)
    for name in ("sizes.json", "stats.json", "failures.jsonl", "duplicates.jsonl"):
        if fs.exists(f"{out}/{name}"):
            fs.rm(f"{out}/{name}")
    if fs.exists(f"{out}/{STAGING}"):
        fs.rm(f"{out}/{STAGING}", recursive=True)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The (dotted) option names whose values differ: ``image.size``, not ``image``."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def _prepare(fs: fsspec.AbstractFileSystem, out: str, cfg: BuildConfig, plan: dict[str, Any]) -> bool:
    """Check the output folder against this build; returns True when the build is already complete."""
    staging = f"{out}/{STAGING}"
    if cfg.overwrite:
        _remove_outputs(fs, out, cfg.prefix)
    if _finished(fs, out):
        with fs.open(f"{out}/stats.json") as f:
            done = json.load(f)
        if not (cfg.resume or cfg.num_nodes > 1):  # a node of several may start after the others finished
            raise FileExistsError(f"{cfg.output} already holds a finished build; pass --overwrite to rebuild it")
        diff = _differences(done.get("plan", {}), plan)
        if diff:
            raise ValueError(f"--resume: {cfg.output} was built with different {', '.join(diff)}")
        return True
    if fs.exists(f"{staging}/plan.json"):
        with fs.open(f"{staging}/plan.json") as f:
            old = json.load(f)
        if not (cfg.resume or cfg.num_nodes > 1):
            raise FileExistsError(
                f"{cfg.output} holds an unfinished build ({STAGING}/); pass --resume to continue it "
                "or --overwrite to start over"
            )
        diff = _differences(old, plan)
        if diff:
            raise ValueError(f"--resume: the unfinished build in {cfg.output} used different {', '.join(diff)}")
    else:
        # A new build writes (and at the end prunes) {prefix}-*.tar: never over files it did not write.
        foreign = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{out}/{cfg.prefix}-*.tar*"))
        foreign += [n for n in ("sizes.json", "stats.json") if fs.exists(f"{out}/{n}")]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FileExistsError(
                f"{cfg.output} holds files this build would overwrite that no accord build here wrote ({shown}); "
                "choose another --output, another --prefix, or pass --overwrite to replace them"
            )
        fs.makedirs(staging, exist_ok=True)
        write_json(fs, f"{staging}/plan.json", plan)
    return False


# --------------------------------------------------------------------------------------------- phase 2: pack
def check_shard_count(n_shards: int, workers: int | None, world_size: int | None) -> str | None:
    """Warning text when shards are too few for every (rank, worker) to get one in a finite epoch."""
    need = (workers or 1) * (world_size or 1)
    if workers is None and world_size is None or n_shards >= need:
        return None
    return (
        f"{n_shards} shards < workers x world size = {workers or 1} x {world_size or 1} = {need}: "
        "some data-loader workers would get no shard; use fewer samples per shard"
    )


# ---------------------------------------------------------------------------------------------------- driver
def build(cfg: BuildConfig) -> dict[str, Any]:
    """Run (or resume) a build; returns the stats written to ``stats.json`` (or this node's part of them)."""
    cfg.validate()
    start = time.perf_counter()
    phases = Phases()
    inputs = survey(cfg.input, cfg.text_column, cfg.progress)
    phases.done("survey")
    n, bs = inputs.inputs, block_size(inputs.inputs)
    n_blocks = block_count(n, bs)
    plan = {
        "version": PLAN_VERSION,
        "inputs": n,
        "block_size": bs,
        "input_digest": inputs.digest,
        **cfg.output_options(),
    }
    plan = json.loads(json.dumps(plan, default=str))
    fs, out = fsspec.core.url_to_fs(cfg.output)
    fs.makedirs(out, exist_ok=True)
    if _prepare(fs, out, cfg, plan):
        with fs.open(f"{out}/stats.json") as f:
            stats = json.load(f)
        if cfg.progress:
            print(f"{cfg.output}: build already complete ({stats['written']} samples in {stats['shards']} shards)")
        return stats
    staging = f"{out}/{STAGING}"
    with contextlib.ExitStack() as stack:
        pool = _pool(cfg, stack)  # started now, so its workers start while the inputs are planned
        stage_inputs(
            fs,
            staging,
            cfg.input,
            cfg.text_column,
            n,
            cfg.shuffle_seed,
            cfg.node_rank,
            cfg.num_nodes,
            cfg.claim_timeout_s,
            cfg.progress,
        )
        phases.done("plan_blocks")
        run = functools.partial(_run_units, cfg, pool, NodeLog(fs, _node_log(cfg, staging)))
        blocks = run(
            "block", n_blocks, _process_block, lambda b: (staging, b, cfg), True, lambda b: block_inputs(n, bs, b)
        )
        phases.done("process")
        planner = f"{staging}/{SHARD_PLANNER}" if cfg.num_nodes > 1 and cfg.node_rank == 0 else None
        with heartbeat(planner, cfg.claim_timeout_s):  # node 0 dedupes and plans; the others wait for its plan
            dedupe_partitions = None
            if cfg.dedupe != "none":
                dedupe_partitions = _dedupe(cfg, run, n, n_blocks)
                phases.done("dedupe")
            if cfg.node_rank == 0:
                packed = plan_shards(
                    fs,
                    out,
                    staging,
                    n_blocks,
                    cfg.prefix,
                    cfg.samples_per_shard,
                    cfg.max_shard_bytes,
                    dedupe_partitions,
                    cfg.progress,
                )
                phases.done("plan_shards")
        if cfg.node_rank != 0:
            n_shards = _wait_for_shard_plan(fs, staging, cfg)
            shards = (
                run("shard", n_shards, write_shard, lambda s: (cfg.output, s), False) if n_shards is not None else 0
            )
            if cfg.progress:
                left = "" if n_shards is not None else " (node 0 planned no shards in --claim-timeout: left to node 0)"
                print(f"node {cfg.node_rank}/{cfg.num_nodes}: converted {blocks} blocks, wrote {shards} shards{left}")
            return {"node_rank": cfg.node_rank, "blocks": blocks, "shards": shards}
        sizes = packed.pop("sizes")
        run("shard", len(sizes), write_shard, lambda s: (cfg.output, s), True)
        phases.done("write_shards")
    for stale in fs.glob(f"{out}/{cfg.prefix}-*.tar"):
        if stale.rsplit("/", 1)[-1] not in sizes:
            fs.rm(stale)
    write_json(fs, f"{out}/sizes.json", sizes)
    stats = {"inputs": n, **packed}
    stats["seconds"] = round(time.perf_counter() - start, 3)
    stats["samples_per_second"] = round(n / stats["seconds"], 2) if stats["seconds"] else None
    stats["phase_seconds"] = phases.seconds  # this node's; the phases it waited in include the wait
    stats["plan"] = plan
    if stats["inputs"] != stats["written"] + stats["rejected"] + stats["duplicates"]:
        raise RuntimeError(f"accounting mismatch: {stats}")  # cannot happen; never write a wrong summary
    write_json(fs, f"{out}/stats.json", stats)
    if not cfg.keep_staging:
        fs.rm(staging, recursive=True)
    if cfg.progress:
        _print_summary(cfg, stats)
    return stats


def _dedupe(cfg: BuildConfig, run: Callable[..., int], n: int, n_blocks: int) -> int:
    """The dedupe pass (:mod:`accord.shards.dedupe`): every node maps groups of blocks and waits until all are
    mapped, then reduces partitions; node 0 waits until all are reduced. Returns the number of partitions."""
    n_partitions, n_groups = partitions(n), groups(n_blocks)
    fs, out = fsspec.core.url_to_fs(cfg.output)
    for kind, count in (("group", n_groups), ("partition", n_partitions)):  # claims are made in these folders
        for first in range(0, count, BLOCKS_PER_FOLDER):
            fs.makedirs(unit_folder(f"{out}/{STAGING}", kind, first), exist_ok=True)
    run("group", n_groups, map_group, lambda g: map_task(cfg.output, g, n_blocks, n_partitions), True)
    run("partition", n_partitions, reduce_partition, lambda p: (cfg.output, p, n_groups), cfg.node_rank == 0)
    return n_partitions


class Phases:
    """Seconds each phase of a build took on this node (``stats.json``'s ``phase_seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def _node_log(cfg: BuildConfig, staging: str) -> str | None:
    return f"{staging}/nodes/node-{cfg.node_rank:04d}.jsonl" if cfg.num_nodes > 1 else None


def _pool(cfg: BuildConfig, stack: contextlib.ExitStack) -> Any:
    """The build's worker processes (None: the blocks run in this process, or as Ray tasks), ended with ``stack``."""
    if cfg.distributor == "ray":
        return None
    if cfg.workers == 1:
        _init_worker()
        return None
    return stack.enter_context(mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker))


UNIT_FIELDS = {  # what a unit's task returns after the unit: its node-log fields
    "block": ("inputs", "rejected"),
    "group": ("samples",),
    "partition": ("duplicates",),
    "shard": ("samples",),
}
UNIT_DESC = {"block": "process", "group": "dedupe: map", "partition": "dedupe: reduce", "shard": "write shards"}


def _run_units(
    cfg: BuildConfig,
    pool: Any,
    log: NodeLog,
    kind: str,
    n: int,
    func: Callable[[Any], tuple[Any, ...]],
    task_of: Callable[[int], tuple[Any, ...]],
    wait: bool,
    weight: Callable[[int], int] = lambda unit: 1,
) -> int:
    """Run ``func(task_of(u))`` for every unit ``u < n`` of ``kind`` (:data:`UNIT_FIELDS`: blocks, dedupe groups and
    partitions, shards) that this node can claim, over the worker pool, in this process, or as Ray tasks, checking
    that each left its done file; with ``wait``, then wait for the others, taking over a dead node's, until all are
    done. The bar advances by ``weight(u)`` (a block: its inputs). Returns how many units this node ran."""
    fs, out = fsspec.core.url_to_fs(cfg.output)
    staging = f"{out}/{STAGING}"
    claims = BlockClaims(fs, staging, n, cfg.num_nodes, cfg.node_rank, cfg.claim_timeout_s, kind=kind)
    missing = set(claims.missing())
    total = sum(weight(u) for u in range(n))
    initial = total - sum(weight(u) for u in missing)
    bar = tqdm(
        total=total,
        initial=initial,
        desc=UNIT_DESC[kind],
        unit="sample" if kind == "block" else kind,
        disable=not cfg.progress,
    )
    ran = rejected = 0
    try:
        while True:
            results: Iterator[tuple[int, tuple[Any, ...]]]
            if cfg.distributor == "ray":  # one node: claims.claim() only skips what is done
                tasks = (task_of(u) for u in range(n) if claims.claim(u))
                results = ((t[1], r) for t, r in _ray_map(func, tasks, cfg, kind))
            else:
                results = _claimed_map(pool, 2 * cfg.workers, claims, func, task_of)
            for unit, result in results:
                if result[0] != unit or not claims.done(unit):
                    raise RuntimeError(f"{kind} {unit}: its task returned but left no done file in {staging}")
                fields = dict(zip(UNIT_FIELDS[kind], result[1:], strict=True))
                log.write(**{kind: unit}, **fields, took_over=unit in claims.taken_over)
                ran += 1
                bar.update(weight(unit))
                if kind == "block":
                    rejected += result[2]
                    bar.set_postfix(rejected=rejected)
            if not wait or not claims.missing() or _finished(fs, out):  # (finished: by the other nodes)
                return ran
            _wait_for_others(claims, kind, cfg.progress)
    finally:
        claims.close()
        bar.close()


def _claimed_map(
    pool: Any, in_flight: int, claims: BlockClaims, func: Callable[[T], tuple[Any, ...]], task_of: Callable[[int], T]
) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """(unit, func(task_of(unit))) for every unit this node can claim now, over the worker ``pool`` (None: in this
    process); ``func`` returns the unit first. Units are claimed as workers become free (at most ``in_flight``
    claimed and not done), never all at once, and released as their results come."""
    slots = threading.BoundedSemaphore(in_flight)
    stop = threading.Event()  # the pool's feeder thread must not wait on a slot once this ends

    def tasks() -> Iterator[T]:
        for unit in claims.candidates():
            while not slots.acquire(timeout=0.5):
                if stop.is_set():
                    return
            if claims.claim(unit):
                yield task_of(unit)
            else:
                slots.release()

    results = map(func, tasks()) if pool is None else pool.imap_unordered(func, tasks())
    try:
        for result in results:
            claims.release(result[0])
            slots.release()
            yield result[0], result
    finally:
        stop.set()


def _ray_map(func: Callable[[Task], R], tasks: Iterable[Task], cfg: BuildConfig, kind: str) -> Iterator[tuple[Task, R]]:
    """(task, func(task)) of every task run as a Ray task (``cfg.ray_retries`` retries, on an error or a lost node),
    in completion order, at most two per cluster CPU in flight; a task whose retries are spent stops the build
    naming it (``kind`` and the task's unit, its second item; a failed task is never taken for a finished one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
    remote = ray.remote(num_cpus=1, max_retries=cfg.ray_retries, retry_exceptions=True)(func)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    in_flight: dict[Any, Task] = {}

    def finish() -> tuple[Task, R]:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        task = in_flight.pop(ready[0])
        try:
            return task, ray.get(ready[0])
        except ray.exceptions.RayError as e:
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"{kind} {task[1]}: its Ray task failed {cfg.ray_retries + 1} times ({cause})") from None

    for task in tasks:
        if len(in_flight) >= limit:
            yield finish()
        in_flight[remote.remote(task)] = task
    while in_flight:
        yield finish()


def _wait_for_shard_plan(fs: fsspec.AbstractFileSystem, staging: str, cfg: BuildConfig) -> int | None:
    """A node but node 0, once every block is committed: the number of shards once node 0 has planned them, or None
    when its heartbeat went stale first (node 0 dead: the shards are left to a restarted node 0)."""
    since = time.time()
    bar = tqdm(desc="waiting for node 0 to plan the shards", disable=not cfg.progress, bar_format="{desc} {elapsed}")
    try:
        while (n := planned_shards(fs, staging)) is None:
            if stale_heartbeat(f"{staging}/{SHARD_PLANNER}", since, cfg.claim_timeout_s):
                return None
            time.sleep(min(1.0, cfg.claim_timeout_s / 4))
        return n
    finally:
        bar.close()


class NodeLog:
    """A line per block a node committed (time, inputs, rejected, whether taken over from a dead node's claim), kept
    in ``rows`` and, on a build over several nodes (a POSIX folder), appended to ``path``
    (``_staging/nodes/node-R.jsonl``) as it goes: each node's progress, readable while the build runs. A one-node
    build keeps it in memory only: object stores cannot append."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str | None):
        self.fs, self.path = fs, path
        self.rows: list[dict[str, Any]] = []
        if path is not None:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def write(self, **row: Any) -> None:
        row = {"time": round(time.time(), 3), **row}
        self.rows.append(row)
        if self.path is not None:
            with self.fs.open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _wait_for_others(claims: BlockClaims, what: str, progress: bool) -> None:
    """Wait until every block (or shard) is done or one can be taken over (its claim went stale, or no one holds
    it); the bar names who holds what is missing."""
    missing = claims.missing()
    bar = tqdm(
        total=claims.n_blocks,
        initial=claims.n_blocks - len(missing),
        desc="waiting for other nodes",
        unit=what,
        disable=not progress,
    )
    while missing:
        if any(claims.claimable(b) for b in missing):
            break
        bar.set_postfix_str(", ".join(f"{k}: {len(v)}" for k, v in claims.holders(missing).items()))
        time.sleep(min(1.0, claims.timeout_s / 4))
        still = claims.missing()
        bar.update(len(missing) - len(still))
        missing = still
    bar.close()


def _print_summary(cfg: BuildConfig, stats: dict[str, Any]) -> None:
    mods = ", ".join(f"{m} {c}" for m, c in stats["modalities"].items() if c)
    print(
        f"\n{cfg.output}: {stats['written']} samples in {stats['shards']} shards "
        f"({stats['bytes'] / 2**20:.1f} MiB) from {stats['inputs']} inputs in {stats['seconds']:.1f} s "
        f"({stats['samples_per_second']} inputs/s)"
    )
    pairs = f"; with a counterfactual pair: {stats['counterfactuals']}" if stats.get("counterfactuals") else ""
    print(f"  modalities: {mods or 'none'}{pairs}")
    print(f"  rejected: {stats['rejected']} (see failures.jsonl)  duplicates: {stats['duplicates']}")
    for reason, count in list(stats["reasons"].items())[:8]:
        print(f"    {count:6d}  {reason}")
    warning = check_shard_count(stats["shards"], cfg.expect_workers, cfg.expect_world_size)
    if warning:
        print(f"  WARNING: {warning}")


# ------------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_shards", description="Turn raw media + captions into validated WebDataset tar shards."
    )
    p.add_argument("--input", required=True, help="manifest (.jsonl/.csv/.tsv/.parquet) or directory; fsspec URLs ok")
    p.add_argument("--output", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="also close a shard before it exceeds this")
    p.add_argument(
        "--dedupe",
        nargs="?",
        const="media",
        default="none",
        choices=("none", "media", "sample"),
        help="drop exact duplicates by content hash of the media (or media+caption with 'sample')",
    )
    p.add_argument("--shuffle-seed", type=int, default=None, help="write samples in a seeded random order")
    p.add_argument("--text-column", default="text", help="caption column of a manifest")
    g = p.add_argument_group("images")
    g.add_argument("--resize-mode", default="keep_ratio", choices=RESIZE_MODES)
    g.add_argument("--image-size", type=int, default=256)
    g.add_argument("--max-side", type=int, default=None, help="cap the longer side after resizing")
    g.add_argument("--resize-only-if-bigger", action="store_true")
    g.add_argument("--min-image-size", type=int, default=0, help="reject images whose shorter side is smaller")
    g.add_argument("--image-format", default="jpg", choices=IMAGE_FORMATS)
    g.add_argument("--image-quality", type=int, default=95)
    g = p.add_argument_group("video")
    g.add_argument("--video-mode", default="keep", choices=("keep", "transcode"))
    g.add_argument("--video-max-side", type=int, default=None)
    g.add_argument("--video-fps", type=float, default=None)
    g.add_argument("--video-max-seconds", type=float, default=None)
    g.add_argument("--video-crf", type=int, default=23)
    g.add_argument("--video-keep-audio", action="store_true", help="keep the audio track when transcoding")
    g.add_argument("--video-timeout", type=float, default=600.0, help="seconds ffmpeg may take per clip (transcode)")
    g.add_argument(
        "--extract-audio",
        action="store_true",
        help="store a video's audio track as the sample's audio when it has none of its own",
    )
    g = p.add_argument_group("audio")
    g.add_argument("--sample-rate", type=int, default=None, help="resample (default: keep the input rate)")
    g.add_argument("--keep-channels", action="store_true", help="keep all channels (default: downmix to mono)")
    g.add_argument("--audio-max-seconds", type=float, default=None)
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    g.add_argument(
        "--distributor",
        default="multiprocessing",
        choices=("multiprocessing", "ray"),
        help="run the blocks in this machine's process pool or as tasks of a Ray cluster",
    )
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    g.add_argument("--ray-retries", type=int, default=3, help="retries of a block's Ray task (error or lost node)")
    g.add_argument("--num-nodes", type=int, default=1, help="machines sharing the build (shared output folder)")
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument(
        "--claim-timeout",
        type=float,
        default=300.0,
        help="seconds after which a dead or hung node's claimed blocks are taken over by another node",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted build")
    g.add_argument("--overwrite", action="store_true", help="delete a previous build in --output first")
    g.add_argument("--keep-staging", action="store_true")
    g.add_argument("--expect-workers", type=int, default=None, help="warn if shards < workers x world size")
    g.add_argument("--expect-world-size", type=int, default=None)
    g.add_argument(
        "--sample-timeout",
        type=float,
        default=300.0,
        help="seconds one input may take to read and convert; over it the input is rejected",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(
        input=args.input,
        output=args.output,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        dedupe=args.dedupe,
        shuffle_seed=args.shuffle_seed,
        text_column=args.text_column,
        image=ImageOptions(
            resize_mode=args.resize_mode,
            size=args.image_size,
            max_side=args.max_side,
            resize_only_if_bigger=args.resize_only_if_bigger,
            min_size=args.min_image_size,
            format=args.image_format,
            quality=args.image_quality,
        ),
        video=VideoOptions(
            mode=args.video_mode,
            max_side=args.video_max_side,
            fps=args.video_fps,
            max_seconds=args.video_max_seconds,
            crf=args.video_crf,
            keep_audio=args.video_keep_audio,
            timeout_s=args.video_timeout,
        ),
        audio=AudioOptions(
            sample_rate=args.sample_rate, mono=not args.keep_channels, max_seconds=args.audio_max_seconds
        ),
        extract_audio=args.extract_audio,
        sample_timeout_s=args.sample_timeout,
        workers=args.workers,
        distributor=args.distributor,
        ray_address=args.ray_address,
        ray_retries=args.ray_retries,
        num_nodes=args.num_nodes,
        claim_timeout_s=args.claim_timeout,
        node_rank=args.node_rank,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_staging=args.keep_staging,
        expect_workers=args.expect_workers,
        expect_world_size=args.expect_world_size,
        progress=not args.quiet,
    )


@command("build_shards", also=(ValueError, FileExistsError, RuntimeError))
def main(argv: list[str] | None = None) -> int:
    build(config_from_args(parser().parse_args(argv)))
    return 0
