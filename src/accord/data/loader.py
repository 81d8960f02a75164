"""The training/eval loader: a DataLoader over the shard stream, with resumable state and skip accounting.

    loader = Loader(cfg, modalities=("text", "image"), train=True)
    loader.load_state_dict(saved)          # optional, before iterating: every rank's saved state (a list)
    for batch in loader:                   # one epoch per iteration
        ...
        state = loader.state_dict()        # this rank's part of where the next batches come from

A resume needs the states of *all* ranks of the saved run (they are merged). With the same layout (world size and
data.workers) every slot continues exactly where it stopped. With another layout, finite mode deals the shards not
yet consumed, each from its first unconsumed sample, to the new slots: the rest of the epoch still sees every
sample exactly once. Resampled mode draws the samples left in the epoch afresh for the new slots.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from accord.data.config import DataConfig
from accord.data.negatives import NegativeSampler
from accord.data.shardcache import check_limit
from accord.data.shardio import ShardUnreadable, is_local
from accord.data.shardlists import expand_sources
from accord.data.stream import ShardStream, rank_and_world, seed_of
from accord.data.transforms import SampleDecoder

# What a data worker imports before its first sample, beside this module's own imports: per modality, and for video
# per backend. The tokenizer module is the costly one (~3 s, most of it transformers' own imports).
WORKER_IMPORTS = {"text": "transformers.models.auto.tokenization_auto", "audio": "torchaudio"}
VIDEO_IMPORTS = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}


def start_method(cfg: DataConfig, modalities: tuple[str, ...]) -> str:
    """How ``cfg``'s data workers start: ``data.start_method``, where auto is fork, or forkserver when audio is
    loaded (torchaudio in forked workers can deadlock)."""
    if cfg.start_method != "auto":
        return cfg.start_method
    return "forkserver" if "audio" in modalities else "fork"


def warm_workers(cfg: DataConfig, modalities: tuple[str, ...]) -> None:
    """Have what data workers import imported once, where they start from, so no set of workers pays for it.

    Workers that fork from this process find the modules here. Forkserver workers fork from the forkserver, which
    is started now with them preloaded: its imports run beside the caller's own start-up (call this early), and each
    later set of workers (an evaluation, an epoch without persistent workers) starts in a fraction of a second
    instead of ~5 s of imports each. The forkserver only imports (it decodes nothing: torchaudio's risk to forked
    workers comes from its use, and its import starts no thread here). Spawned workers import for themselves.
    Idempotent; nothing without workers.
    """
    if cfg.workers <= 0:
        return
    modules = ["accord.data.loader", *(WORKER_IMPORTS[m] for m in modalities if m in WORKER_IMPORTS)]
    if "video" in modalities:
        modules.append(VIDEO_IMPORTS[cfg.video.backend])
    method = start_method(cfg, modalities)
    if method == "fork":
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:  # an optional backend: the worker that needs it says so where it decodes
                pass
    elif method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(modules)  # no-op once it runs
        multiprocessing.forkserver.ensure_running()


class TooManyBadSamples(RuntimeError):
    pass


class NoSamples(RuntimeError):
    """An epoch of the training data gave no batch at all (every sample bad, filtered or unreadable)."""


class DataStalled(RuntimeError):
    """A data worker sent no batch within the worker timeout; the message names the rank, worker and pid."""


def exit_with_owner(owner_pid: int, _worker_id: int, interval_s: float = 1.0) -> None:
    """DataLoader ``worker_init_fn``: end this worker once the process that owns the loader is gone.

    PyTorch's own check watches the worker's parent, which for forkserver workers is the forkserver; and every
    worker keeps the forkserver alive. So a SIGKILLed rank (a lost node, the launcher ending a failed job) would
    leave its workers and their shared memory behind for good.
    """

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="accord-owner-watch", daemon=True).start()


class Loader:
    """Iterates epochs of batches for this rank; ``state_dict()`` after any batch allows an exact resume."""

    def __init__(
        self,
        cfg: DataConfig,
        modalities: tuple[str, ...],
        train: bool = True,
        spec: str | None = None,
        rank: int | None = None,
        world: int | None = None,
        label_key: str | None = None,
        negatives: NegativeSampler | None = None,
        worker_timeout_s: float | None = None,
    ):
        spec = spec or (cfg.train if train else cfg.val)
        if not spec:
            raise ValueError(f"data.{'train' if train else 'val'}: no shards given")
        if rank is None or world is None:
            rank, world = rank_and_world()
        self.cfg, self.rank, self.world, self.train = cfg, rank, world, train
        # cfg's value, else the caller's default; 0 or None: wait for a worker forever
        self.worker_timeout_s = worker_timeout_s if cfg.worker_timeout_s is None else cfg.worker_timeout_s
        self.decoder = SampleDecoder(cfg, modalities, train, label_key, negatives)
        self.dataset = ShardStream(
            expand_sources(spec), cfg, self.decoder, train, rank, world, cfg.weights if train else None
        )
        cache = self.dataset.cache
        if cache is not None and cache.limit is not None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            remote = (s.url for s in self.dataset.shards if not is_local(s.url))  # only the first few are asked
            check_limit(cache.limit, remote, max(1, cfg.workers) * local_world)
        self._epoch = 0  # the epoch being read (or last read, when self._done)
        self._done = False  # this rank's part of self._epoch has been read to the end
        self.progress: dict[int, dict[str, Any]] = {}  # slot -> progress of its last batch this epoch
        self.last_local: int | None = None  # local slot of the last batch (next epoch's rotation)
        self._start: dict[str, Any] = {}  # where this epoch started: consumed / positions / elastic / rotation
        self._counters: dict[int, dict[str, int]] = {}  # slot -> counters of this epoch so far
        self._past: Counter = Counter()  # the counters of this run's earlier epochs
        self._loader: DataLoader | None = None

    @property
    def num_samples(self) -> int:
        """Samples per epoch across all ranks (finite: from sizes.json; resampled: epoch_samples)."""
        return self.dataset.epoch_samples

    def planned_steps(self, epoch: int, accum_steps: int = 1) -> int:
        """Optimiser steps of a whole ``epoch`` over every rank of this layout: ranks run in lock-step until the one
        with the most batches is done (groups of ``accum_steps``), counted from sizes.json without reading a shard."""
        workers = max(1, self.cfg.workers)
        batches = self.dataset.planned_batches(epoch)  # per slot; rank r holds slots r * workers ...
        per_rank = (sum(batches[r * workers : (r + 1) * workers]) for r in range(self.world))
        return max(-(-b // accum_steps) for b in per_rank)

    def _make_loader(self) -> DataLoader:
        workers = self.cfg.workers
        method = start_method(self.cfg, self.decoder.modalities)
        warm_workers(self.cfg, self.decoder.modalities)
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=self.cfg.persistent_workers and workers > 0,
            multiprocessing_context=method if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None,
            timeout=(self.worker_timeout_s or 0) if workers > 0 else 0,
            in_order=True,
            worker_init_fn=functools.partial(exit_with_owner, os.getpid()) if workers > 0 else None,
            # Its own generator: an iterator draws its workers' base seed from it, not from the global one, so
            # creating one (a new epoch, an evaluation, a resume) leaves the training process's RNG (dropout) as it was.
            generator=torch.Generator().manual_seed(seed_of(self.cfg.seed, "loader", self.rank, self._epoch) >> 1),
        )

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to; after an epoch's last batch, the next one's index."""
        return self._epoch + self._done

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._done:  # a new epoch: nothing of it consumed yet
            self._epoch, self._done, self.progress, self.last_local = self._epoch + 1, False, {}, None
            self._start = {}
            for counters in self._counters.values():  # each epoch's stream counts from zero
                self._past.update(counters)
            self._counters = {}
        persistent = self._loader is not None and self.cfg.persistent_workers and self.cfg.workers > 0
        if not persistent:
            # Fresh workers get this epoch and (when resuming) where to start; persistent ones count epochs.
            self.dataset.start_epoch = self._epoch
            self.dataset.start_consumed = self._start.get("consumed", {})
            self.dataset.start_redeal = self._start.get("redeal", False)
            self.dataset.start_positions = self._start.get("positions", {})
            self.dataset.elastic = self._start.get("elastic")
            self.dataset.rotation = self._start.get("rotation", 0)
            self.dataset._iterations = 0
        if self._loader is None or not persistent:
            self._loader = self._make_loader()
        batches: Any = None
        while True:
            try:  # iter(): persistent workers are told the new epoch, and that waits on them too
                batches = iter(self._loader) if batches is None else batches
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                stuck = batches if batches is not None else getattr(self._loader, "_iterator", None)
                raise DataStalled(self._stalled(stuck)) from None
            meta = batch.pop("__meta__")
            self.progress[meta["slot"]] = meta
            self.last_local = meta["local"]
            self._counters[meta["slot"]] = meta["counters"]
            if meta["io_errors"] and self.train:  # evaluation counts the lost samples instead (report())
                raise ShardUnreadable(f"{meta['io_errors'][0]} (data worker {meta['local']})")
            self._check_bad()
            if batch:  # the stream's last item may carry counters only
                yield batch
        self._done = True

    def _stalled(self, batches: Any) -> str:
        """Which worker the loader was waiting for (read from the DataLoader iterator; torch keeps it private)."""
        worker, pid = "?", "?"
        try:
            worker = batches._task_info[batches._rcvd_idx][0]
            pid = batches._workers[worker].pid
        except (AttributeError, KeyError, IndexError, TypeError):
            pass
        return (
            f"data worker {worker} (pid {pid}) of rank {self.rank} sent no batch for {self.worker_timeout_s:g} s "
            "(data.worker_timeout_s): a hung read (file system, network) or decode"
        )

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """This rank's part: per shard of its slots, the samples consumed this epoch (finite mode; None = all),
        and per slot the samples consumed (resampled mode)."""
        workers = max(1, self.cfg.workers)
        rotation = 0 if self.last_local is None else (self.last_local + 1) % workers
        start_consumed = self._start.get("consumed", {})
        redeal = self._start.get("redeal", False)
        # After a re-deal the shards finished before it are in no slot's items: every rank carries them on.
        consumed: dict[str, int | None] = dict(self.dataset.finished_shards(start_consumed)) if redeal else {}
        positions: dict[int, int] = {}
        for slot in range(self.rank * workers, (self.rank + 1) * workers):
            meta = self.progress.get(slot)
            positions[slot] = meta["position"] if meta else self._start.get("positions", {}).get(slot, 0)
            if self.cfg.mode != "finite":
                continue
            items = self.dataset.slot_items(self._epoch, slot, start_consumed, redeal)
            for j, (shard, before) in enumerate(items):
                if self._done or (meta is not None and j < meta["item"]):
                    consumed[shard.name] = None
                elif meta is not None and j == meta["item"]:
                    consumed[shard.name] = meta["offset"]
                else:
                    consumed[shard.name] = before
        return {
            "version": 2,
            "rank": self.rank,
            "world": self.world,
            "workers": workers,
            "seed": self.cfg.seed,
            "mode": self.cfg.mode,
            "shuffle": self.cfg.shuffle,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "epoch": self._epoch,
            "done": self._done,
            "consumed": consumed,
            "positions": positions,
            "rotation": rotation,
            "elastic": self._start.get("elastic"),
            "redeal": redeal,
        }

    def load_state_dict(self, states: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Resume from the states of every rank of a saved run (a dict when it had one rank), on any layout."""
        states = sorted([states] if isinstance(states, dict) else list(states), key=lambda st: st.get("rank", 0))
        if not states or any(st.get("version") != 2 for st in states):
            raise ValueError("cannot resume the data loader: no state, or a state saved by an older accord")
        first = states[0]
        for key in ("seed", "mode", "shuffle", "shuffle_buffer"):  # what decides the samples a count stands for
            mine = getattr(self.cfg, key)
            if first.get(key, mine) != mine:
                raise ValueError(f"cannot resume the data loader: saved data.{key}={first[key]!r}, now {mine!r}")
        if [st["rank"] for st in states] != list(range(first["world"])):
            raise ValueError(
                f"cannot resume the data loader: it needs the state of every rank of the saved run "
                f"(ranks 0..{first['world'] - 1}), got ranks {[st['rank'] for st in states]}"
            )
        if self._loader is not None and self.cfg.persistent_workers and self.cfg.workers > 0:
            raise RuntimeError("load_state_dict must be called before the first iteration")
        # Ranks advance in lock-step, so at a checkpoint some may have finished their part of the epoch (done).
        epoch = min(st["epoch"] + st["done"] for st in states)
        inside = [st for st in states if st["epoch"] == epoch]  # empty when every rank had finished
        same_layout = (first["world"], first["workers"]) == (self.world, max(1, self.cfg.workers))
        start: dict[str, Any] = {}
        if inside and same_layout:
            start["rotation"] = states[self.rank]["rotation"]
        if inside and self.cfg.mode == "finite":
            # disjoint, but for the finished shards every rank carries on after a re-deal (all None)
            start["consumed"] = {name: n for st in inside for name, n in st["consumed"].items()}
            start["redeal"] = not same_layout or any(st.get("redeal") for st in inside)
        elif inside:
            positions = {int(k): v for st in inside for k, v in st["positions"].items()}
            elastic = inside[0]["elastic"]
            if same_layout:
                start.update(positions=positions, elastic=elastic)
            else:  # draw what is left of the epoch afresh for the new slots
                left = (elastic[0] if elastic else self.num_samples) - sum(positions.values())
                start["elastic"] = (max(0, left), first["world"] * first["workers"])
        self._epoch, self._done, self.progress, self._start = epoch, False, {}, start

    # ---------------------------------------------------------------------------------------- bad samples
    def skip_stats(self) -> dict[str, int]:
        """This rank's counts since the start of this run: 'seen', 'bad: <reason>', 'filtered: <reason>', and of its
        remote reads 'io: retries' (reopenings after a fault) and 'io: failures' (shards given up on)."""
        total: Counter = Counter(self._past)
        for counters in self._counters.values():
            total.update(counters)
        return dict(total)

    def report(self) -> dict[str, Any]:
        """What this rank read since the start of the run: samples read, skipped per reason, and the samples
        sizes.json promises for one epoch of the whole data set (None where it does not know every shard)."""
        stats = self.skip_stats()
        skipped = {k: v for k, v in sorted(stats.items()) if k != "seen" and not k.startswith("io: ")}
        known = all(s.size is not None for s in self.dataset.shards)
        return {
            "read": stats.get("seen", 0) - sum(skipped.values()),
            "skipped": skipped,
            "expected": self.num_samples if known and self.cfg.mode == "finite" else None,
            "io": {"retries": stats.get("io: retries", 0), "failures": stats.get("io: failures", 0)},
        }

    def _check_bad(self) -> None:
        stats = self.skip_stats()
        seen = stats.get("seen", 0)
        bad = sum(v for k, v in stats.items() if k.startswith("bad: "))
        if seen >= self.cfg.min_samples_for_check and bad > self.cfg.max_bad_fraction * seen:
            reasons = ", ".join(f"{k[5:]}: {v}" for k, v in sorted(stats.items()) if k.startswith("bad: "))
            raise TooManyBadSamples(
                f"{bad} of {seen} samples on rank {self.rank} are bad ({reasons}); above "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}. Check the shards with "
                "data_tools/verify_shards.py --decode"
            )

    def close(self) -> None:
        self._loader = None
