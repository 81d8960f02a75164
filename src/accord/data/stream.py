"""The shard stream: which shards each (rank, worker) reads per epoch, in what order, and from where to resume.

Every data-loader worker of every rank is a *slot* ``g = rank * workers + local``. Per epoch:

- finite mode: the shard list is shuffled with (seed, epoch) and slot g reads shards ``g, g + S, g + 2S, ...``
  (S = world x workers), so each sample is read exactly once per epoch across all ranks and workers;
- resampled mode: slot g draws shards with replacement (per-source weights) from an RNG seeded with
  (seed, epoch, g), and reads ``epoch_samples / S`` samples.

Within a shard, samples pass through a shuffle buffer seeded with (seed, epoch, shard). A slot's *position* is the
number of raw samples it has consumed in the epoch (bad ones included); each batch carries it. Resuming from a
position skips whole shards by their ``sizes.json`` counts and replays the partial shard without decoding, so the
resumed stream continues with exactly the samples an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from accord.data.config import DataConfig
from accord.data.shardlists import Shard, open_shard
from accord.data.transforms import BadSample, SampleDecoder, collate


def seed_of(*parts: Any) -> int:
    """A stable 64-bit seed from any values (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class ShardStream(IterableDataset):
    """Yields collated batches of this slot's samples; see the module docstring for the epoch plan."""

    def __init__(self, sources: list[list[Shard]], cfg: DataConfig, decoder: SampleDecoder, train: bool,
                 rank: int, world: int, weights: list[float] | None = None):
        super().__init__()
        self.sources, self.cfg, self.decoder, self.train = sources, cfg, decoder, train
        self.rank, self.world = rank, world
        self.weights = weights or [1.0] * len(sources)
        self.shards = [s for src in sources for s in src]
        self.workers = max(1, cfg.workers)
        self.slots = world * self.workers
        if cfg.mode == "finite" and len(self.shards) < self.slots:
            raise ValueError(
                f"{len(self.shards)} shards < world size x data workers = {world} x {self.workers} = {self.slots}: "
                "in finite mode some workers would get no data. Rebuild with fewer samples per shard, "
                "lower data.workers, or use data.mode=resampled")
        if cfg.mode == "resampled" and any(s.size is None for s in self.shards):
            missing = next(s.url for s in self.shards if s.size is None)
            raise ValueError(f"resampled mode needs sample counts: no sizes.json entry for {missing}")
        total = sum(s.size or 0 for s in self.shards)
        self.epoch_samples = cfg.epoch_samples or total
        # Set by the loader before each epoch's iterator is created (see Loader.__iter__).
        self.start_epoch, self.start_positions, self.rotation, self._iterations = 0, {}, 0, 0

    # ------------------------------------------------------------------------------------------- epoch plan
    def slot_shards(self, epoch: int, slot: int) -> Iterator[Shard]:
        if self.cfg.mode == "finite":
            order = list(self.shards)
            if self.train and self.cfg.shuffle:
                random.Random(seed_of(self.cfg.seed, epoch)).shuffle(order)
            yield from order[slot :: self.slots]
            return
        rng = random.Random(seed_of(self.cfg.seed, epoch, slot))
        while True:
            src = rng.choices(range(len(self.sources)), weights=self.weights)[0]
            yield rng.choice(self.sources[src])

    def slot_quota(self, slot: int) -> int | None:
        """Samples a slot reads per epoch in resampled mode (None: the whole assigned shards)."""
        if self.cfg.mode == "finite":
            return None
        base, extra = divmod(self.epoch_samples, self.slots)
        return base + (1 if slot < extra else 0)

    # --------------------------------------------------------------------------------------------- reading
    def raw_samples(self, shard: Shard, epoch: int) -> Iterator[dict[str, Any] | str]:
        """Samples of one shard through the seeded shuffle buffer. Samples lost to a corrupt tar (per sizes.json,
        at least one) come out as their reason string, so that positions stay aligned with sample counts."""
        read = 0

        def samples() -> Iterator[dict[str, Any]]:
            nonlocal read
            stream = open_shard(shard.url)
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
        except (tarfile.TarError, OSError, ValueError) as e:
            yield from _drain(buffer, rng)
            yield from [f"corrupt tar ({type(e).__name__})"] * max(1, (shard.size or 0) - read)
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
        skip = self.start_positions.get(slot, 0) if self._iterations == 0 else 0
        self._iterations += 1
        quota = self.slot_quota(slot)
        position = 0
        counters: Counter = Counter()
        batch: list[dict[str, Any]] = []
        pad_id = 0
        if "text" in self.decoder.modalities:
            pad_id = self.decoder.tokenizer.pad_token_id or 0

        def emit() -> dict[str, Any]:
            out = collate(batch, self.decoder, pad_id) if batch else {}  # {}: end-of-stream counters only
            out["__meta__"] = {"slot": slot, "local": local, "position": position, "epoch": epoch,
                               "counters": dict(counters)}
            batch.clear()
            return out

        for shard in self.slot_shards(epoch, slot):
            if quota is not None and position >= quota:
                break
            if shard.size is not None and position + shard.size <= skip:
                position += shard.size  # resume: skip a whole shard without opening it
                continue
            for raw in self.raw_samples(shard, epoch):
                if quota is not None and position >= quota:
                    break
                position += 1
                if position <= skip:
                    continue  # resume: replayed without decoding
                counters["seen"] += 1
                if isinstance(raw, str):
                    counters[f"bad: {raw}"] += 1
                    continue
                rng = random.Random(seed_of(self.cfg.seed, epoch, shard.name, raw["__key__"]))
                try:
                    batch.append(self.decoder(raw, rng))
                except BadSample as e:
                    counters[("bad: " if e.bad else "filtered: ") + e.reason] += 1
                    continue
                if len(batch) == self.cfg.batch_size:
                    yield emit()
        yield emit()  # the last partial batch, or just the final position and counters


def _drain(buffer: list[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop()


def rank_and_world() -> tuple[int, int]:
    """From torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
