"""The shard stream: which shards each (rank, worker) reads per epoch, in what order, and from where to resume.

Every data-loader worker of every rank is a *slot* ``g = rank * workers + local``. Per epoch:

- finite mode: the shard list is shuffled with (seed, epoch) into the epoch's *global order*, which does not depend
  on the number of ranks or workers. Each shard carries how many of its samples are already *consumed* this epoch
  (0 at the start; set when resuming), and slot g reads the items ``g, g + S, g + 2S, ...`` of that list
  (S = world x workers), skipping each shard's consumed samples: every sample is read exactly once per epoch across
  all ranks and workers, also after a resume on another world size (the consumed counts are global; there the
  shards not yet finished are dealt round-robin instead, so that no new slot idles);
- resampled mode: slot g draws shards with replacement (per-source weights) from an RNG seeded with
  (seed, epoch, g), and reads ``epoch_samples / S`` samples.

Within a shard, samples pass through a shuffle buffer seeded with (seed, epoch, shard), so a shard's sample order is
the same whichever slot reads it. Each batch carries its slot's progress: the index of the shard it is reading in
its list and how many of that shard's samples are consumed (bad ones included), plus (resampled) the slot's
*position*, its raw samples consumed. Resuming skips whole shards by their ``sizes.json`` counts and replays a
partial shard without decoding, so the resumed stream continues with exactly the samples not yet consumed.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from accord.config import parse_bytes
from accord.data.config import DataConfig
from accord.data.shardcache import ShardCache
from accord.data.shardio import IOPolicy, ShardUnreadable, is_local, open_shard
from accord.data.shardlists import Shard
from accord.data.transforms import BadSample, SampleDecoder, collate


def seed_of(*parts: Any) -> int:
    """A stable 64-bit seed from any values (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class ShardStream(IterableDataset):
    """Yields collated batches of this slot's samples; see the module docstring for the epoch plan."""

    def __init__(
        self,
        sources: list[list[Shard]],
        cfg: DataConfig,
        decoder: SampleDecoder,
        train: bool,
        rank: int,
        world: int,
        weights: list[float] | None = None,
    ):
        super().__init__()
        self.sources, self.cfg, self.decoder, self.train = sources, cfg, decoder, train
        self.rank, self.world = rank, world
        self.weights = weights or [1.0] * len(sources)
        self.io = IOPolicy(cfg.io_retries, cfg.io_timeout_s, cfg.io_backoff_s)
        self.cache: ShardCache | None = None
        if cfg.cache_dir:
            limit = parse_bytes(cfg.cache_limit, "data.cache_limit") if cfg.cache_limit is not None else None
            self.cache = ShardCache(cfg.cache_dir, limit, self.io)
        self.shards = [s for src in sources for s in src]
        self.workers = max(1, cfg.workers)
        self.slots = world * self.workers
        if cfg.mode == "finite" and len(self.shards) < self.slots:
            raise ValueError(
                f"{len(self.shards)} shards < world size x data workers = {world} x {self.workers} = {self.slots}: "
                "in finite mode some workers would get no data. Rebuild with fewer samples per shard, "
                "lower data.workers, or use data.mode=resampled"
            )
        if cfg.mode == "resampled" and any(s.size is None for s in self.shards):
            missing = next(s.url for s in self.shards if s.size is None)
            raise ValueError(f"resampled mode needs sample counts: no sizes.json entry for {missing}")
        total = sum(s.size or 0 for s in self.shards)
        self.epoch_samples = cfg.epoch_samples or total
        # Set by the loader before each epoch's iterator is created (see Loader.__iter__): where the first epoch
        # of this iterator starts. consumed: finite mode, shard name -> samples consumed (None: all of them);
        # positions: resampled mode, slot -> samples consumed; elastic: resampled mode after a change of layout,
        # (samples left in the epoch, the saved layout) - fresh draws for the rest of the epoch.
        self.start_epoch, self.rotation, self._iterations = 0, 0, 0
        self.start_consumed: dict[str, int | None] = {}
        self.start_redeal = False  # finite mode: start_consumed came from another layout (see slot_items)
        self.start_positions: dict[int, int] = {}
        self.elastic: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------- epoch plan
    def epoch_order(self, epoch: int) -> list[Shard]:
        """Finite mode: the epoch's global shard order (independent of world size and workers)."""
        order = list(self.shards)
        if self.train and self.cfg.shuffle:
            random.Random(seed_of(self.cfg.seed, epoch)).shuffle(order)
        return order

    def slot_items(
        self, epoch: int, slot: int, consumed: dict[str, int | None], redeal: bool = False
    ) -> list[tuple[Shard, int | None]]:
        """Finite mode: the (shard, samples already consumed) items slot ``slot`` reads this epoch. ``redeal`` (a
        resume on another layout): only the shards not yet finished are dealt round-robin, so no new slot idles
        while another has several left."""
        items = [(s, consumed.get(s.name, 0)) for s in self.epoch_order(epoch)]
        if redeal:
            items = [(s, n) for s, n in items if not finished(s, n)]
        return items[slot :: self.slots]

    def planned_batches(self, epoch: int) -> list[int]:
        """Batches each slot yields in a whole ``epoch`` when no sample is bad or filtered (sizes.json counts; a
        slot's last batch may be partial). One pass over the epoch's shard order."""
        if self.cfg.mode == "finite":
            sizes = [s.size or 0 for s in self.epoch_order(epoch)]
            samples = [sum(sizes[slot :: self.slots]) for slot in range(self.slots)]
        else:
            samples = [self.slot_quota(slot, elastic=False) for slot in range(self.slots)]
        return [-(-n // self.cfg.batch_size) for n in samples]

    def finished_shards(self, consumed: dict[str, int | None]) -> dict[str, None]:
        """The shards ``consumed`` says are read to the end (as None)."""
        return {s.name: None for s in self.shards if s.name in consumed and finished(s, consumed[s.name])}

    def resampled_shards(self, epoch: int, slot: int, elastic: bool) -> Iterator[Shard]:
        """Resampled mode: the shards slot ``slot`` draws (after a change of layout, fresh draws for it)."""
        seed = seed_of(self.cfg.seed, epoch, slot)
        if elastic and self.elastic is not None:
            seed = seed_of(self.cfg.seed, epoch, slot, "elastic", *self.elastic, self.slots)
        rng = random.Random(seed)
        while True:
            src = rng.choices(range(len(self.sources)), weights=self.weights)[0]
            yield rng.choice(self.sources[src])

    def slot_quota(self, slot: int, elastic: bool) -> int:
        """Samples a slot reads in resampled mode: its share of the epoch (or of what is left of it after a change
        of layout)."""
        total = self.elastic[0] if elastic and self.elastic is not None else self.epoch_samples
        base, extra = divmod(total, self.slots)
        return base + (1 if slot < extra else 0)

    # --------------------------------------------------------------------------------------------- reading
    def open(self, url: str, on_retry: Any = None) -> Any:
        """A shard's bytes: from the cache when there is one and the shard is remote, else read directly."""
        if self.cache is not None and not is_local(url):
            return self.cache.open(url, on_retry)
        return open_shard(url, self.io, on_retry)

    def prefetch(self, shard: Shard, counters: Counter) -> None:
        """With a cache: start downloading the shard this slot reads next."""
        if self.cache is not None and not is_local(shard.url):
            self.cache.prefetch(shard.url, lambda: counters.update(["io: retries"]))

    def raw_samples(
        self, shard: Shard, epoch: int, counters: Counter, errors: list[str]
    ) -> Iterator[dict[str, Any] | str]:
        """Samples of one shard through the seeded shuffle buffer. Samples lost to a corrupt tar or to a remote
        shard whose retries are spent (per sizes.json, at least one) come out as their reason string, so that
        positions stay aligned with sample counts. ``counters`` gets 'io: retries' and 'io: failures'; ``errors``
        the message of each shard given up on."""
        read = 0

        def retried() -> None:
            counters["io: retries"] += 1

        def samples() -> Iterator[dict[str, Any]]:
            nonlocal read
            stream = self.open(shard.url, retried)
            try:
                files = ({**f, "__url__": shard.url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    read += 1
                    yield sample
            finally:
                stream.close()

        rng = random.Random(seed_of(self.cfg.seed, epoch, shard.name))
        buffer: list[dict[str, Any]] = []
        size = self.cfg.shuffle_buffer if self.train and self.cfg.shuffle else 1
        try:
            for sample in samples():
                if size <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= size:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        except (tarfile.TarError, OSError, ValueError, ShardUnreadable) as e:
            yield from _drain(buffer, rng)
            # the samples sizes.json promised and did not come; 1 where it does not know (nothing after the last one)
            lost = shard.size - read if shard.size is not None else 1
            if isinstance(e, ShardUnreadable):
                counters["io: failures"] += 1
                errors.append(e.message)
                yield from ["unreadable (data.io_retries spent)"] * lost
            else:
                yield from [f"corrupt tar ({type(e).__name__})"] * lost
            return
        yield from _drain(buffer, rng)
        if shard.size is not None and read < shard.size:
            yield from ["missing samples (fewer than sizes.json)"] * (shard.size - read)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rotation = self.rotation if self._iterations == 0 else 0
        local = (worker + rotation) % self.workers
        return local, self.rank * self.workers + local

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.start_epoch + self._iterations
        local, slot = self._slot()
        first = self._iterations == 0
        self._iterations += 1
        if self.cfg.mode == "finite":
            items = self.slot_items(epoch, slot, self.start_consumed if first else {}, first and self.start_redeal)
            yield from self._read(epoch, local, slot, items, quota=None, skip=0)
        else:
            elastic = first and self.elastic is not None
            shards = ((s, 0) for s in self.resampled_shards(epoch, slot, elastic))
            skip = self.start_positions.get(slot, 0) if first else 0
            yield from self._read(epoch, local, slot, shards, quota=self.slot_quota(slot, elastic), skip=skip)

    def _read(
        self, epoch: int, local: int, slot: int, items: Iterable[tuple[Shard, int | None]], quota: int | None, skip: int
    ) -> Iterator[dict[str, Any]]:
        """Decode and batch the samples of ``items`` (shard, samples of it to skip); resampled mode stops after
        ``quota`` samples and first replays ``skip`` of them without decoding."""
        position, item = 0, 0
        offset: int | None = 0
        counters: Counter = Counter()
        errors: list[str] = []  # shards given up on (their retries spent)
        batch: list[dict[str, Any]] = []
        pad_id = 0
        if "text" in self.decoder.modalities:
            pad_id = self.decoder.tokenizer.pad_token_id or 0

        def emit() -> dict[str, Any]:
            out = collate(batch, self.decoder, pad_id) if batch else {}  # {}: end-of-stream counters only
            out["__meta__"] = {
                "slot": slot,
                "local": local,
                "epoch": epoch,
                "position": position,
                "item": item,
                "offset": offset,
                "counters": dict(counters),
                "io_errors": list(errors),
            }
            batch.clear()
            return out

        for item, ((shard, consumed), upcoming) in enumerate(lookahead(items)):  # noqa: B007 (emit() reports item)
            offset = consumed
            if quota is not None and position >= quota:
                break
            if consumed is None or finished(shard, consumed):  # (None: finished, said for the type checker)
                continue  # resume: a shard consumed before, not opened
            if shard.size is not None and position + shard.size <= skip:
                position += shard.size  # resume (resampled): skip a whole shard without opening it
                continue
            offset = 0
            if upcoming is not None and not finished(*upcoming):
                self.prefetch(upcoming[0], counters)
            for raw in self.raw_samples(shard, epoch, counters, errors):
                if quota is not None and position >= quota:
                    break
                offset += 1
                if offset <= consumed:
                    continue  # resume (finite): replayed without decoding
                position += 1
                if position <= skip:
                    continue  # resume (resampled): replayed without decoding
                counters["seen"] += 1
                if isinstance(raw, str):
                    counters[f"bad: {raw}"] += 1
                    continue
                rng = random.Random(seed_of(self.cfg.seed, epoch, shard.name, raw["__key__"]))
                try:
                    batch.append({**self.decoder(raw, rng), "__shard__": shard.name})
                except BadSample as e:
                    counters[("bad: " if e.bad else "filtered: ") + e.reason] += 1
                    continue
                if len(batch) == self.cfg.batch_size:
                    yield emit()
            else:
                offset = None  # the whole shard is consumed (also when sizes.json does not know its size)
        yield emit()  # the last partial batch, or just the final progress and counters


def lookahead(items: Iterable[Any]) -> Iterator[tuple[Any, Any | None]]:
    """Each item with the one after it (None after the last)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, upcoming
        current = upcoming
    yield current, None


def finished(shard: Shard, consumed: int | None) -> bool:
    """Whether a shard with ``consumed`` samples consumed (None: all) has nothing left to read."""
    return consumed is None or (shard.size is not None and consumed >= shard.size)


def _drain(buffer: list[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop()


def rank_and_world() -> tuple[int, int]:
    """From torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
