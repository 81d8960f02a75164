"""The training/eval loader: a DataLoader over the shard stream, with resumable state and skip accounting.

    loader = Loader(cfg, modalities=("text", "image"), train=True)
    loader.load_state_dict(saved)          # optional, before iterating
    for batch in loader:                   # one epoch per iteration
        ...
        state = loader.state_dict()        # exactly where the next batch will come from
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from accord.data.config import DataConfig
from accord.data.shardlists import expand_sources
from accord.data.stream import ShardStream, rank_and_world
from accord.data.transforms import SampleDecoder


class TooManyBadSamples(RuntimeError):
    pass


class Loader:
    """Iterates epochs of batches for this rank; ``state_dict()`` after any batch allows an exact resume."""

    def __init__(self, cfg: DataConfig, modalities: tuple[str, ...], train: bool = True, spec: str | None = None,
                 rank: int | None = None, world: int | None = None):
        spec = spec or (cfg.train if train else cfg.val)
        if not spec:
            raise ValueError(f"data.{'train' if train else 'val'}: no shards given")
        if rank is None or world is None:
            rank, world = rank_and_world()
        self.cfg, self.rank, self.world = cfg, rank, world
        self.decoder = SampleDecoder(cfg, modalities, train)
        self.dataset = ShardStream(expand_sources(spec), cfg, self.decoder, train, rank, world,
                                   cfg.weights if train else None)
        self.epoch = 0
        self.positions: dict[int, int] = {}  # slot -> raw samples consumed this epoch
        self.last_local: int | None = None  # local slot of the last batch (next epoch's rotation)
        self._resume: dict[str, Any] | None = None
        self._counters: dict[int, dict[str, int]] = {}  # slot -> cumulative counters of this run
        self._loader: DataLoader | None = None

    @property
    def num_samples(self) -> int:
        """Samples per epoch across all ranks (finite: from sizes.json; resampled: epoch_samples)."""
        return self.dataset.epoch_samples

    def _make_loader(self) -> DataLoader:
        workers = self.cfg.workers
        method = self.cfg.start_method
        if method == "auto":
            method = "forkserver" if "audio" in self.decoder.modalities else "fork"
        return DataLoader(
            self.dataset, batch_size=None, num_workers=workers,
            persistent_workers=self.cfg.persistent_workers and workers > 0,
            multiprocessing_context=method if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None, in_order=True,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        persistent = self._loader is not None and self.cfg.persistent_workers and self.cfg.workers > 0
        if not persistent:
            # Fresh workers get this epoch and (when resuming) positions; persistent ones count epochs themselves.
            resume = self._resume or {}
            self.dataset.start_epoch = self.epoch
            self.dataset.start_positions = {int(k): v for k, v in resume.get("positions", {}).items()}
            self.dataset.rotation = resume.get("rotation", 0)
            self.dataset._iterations = 0
        if self._loader is None or not persistent:
            self._loader = self._make_loader()
        self._resume = None
        for batch in self._loader:
            meta = batch.pop("__meta__")
            self.positions[meta["slot"]] = meta["position"]
            self.last_local = meta["local"]
            self._counters[meta["slot"]] = meta["counters"]
            self._check_bad()
            if batch:  # the stream's last item may carry counters only
                yield batch
        self.epoch += 1
        self.positions, self.last_local = {}, None

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        workers = max(1, self.cfg.workers)
        rotation = 0 if self.last_local is None else (self.last_local + 1) % workers
        return {"epoch": self.epoch, "positions": dict(self.positions), "rotation": rotation,
                "world": self.world, "workers": self.cfg.workers, "seed": self.cfg.seed, "mode": self.cfg.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("world", self.world), ("workers", self.cfg.workers), ("seed", self.cfg.seed),
                          ("mode", self.cfg.mode)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the data loader: saved {key}={state.get(key)!r}, now {mine!r} "
                                 "(an exact resume needs the same world size, data.workers, data.seed, data.mode)")
        if self._loader is not None and self.cfg.persistent_workers and self.cfg.workers > 0:
            raise RuntimeError("load_state_dict must be called before the first iteration")
        self.epoch = state["epoch"]
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self._resume = {"positions": self.positions, "rotation": state.get("rotation", 0)}

    # ---------------------------------------------------------------------------------------- bad samples
    def skip_stats(self) -> dict[str, int]:
        """This rank's counts since the start of this run: 'seen', 'bad: <reason>', 'filtered: <reason>'."""
        total: Counter = Counter()
        for counters in self._counters.values():
            total.update(counters)
        return dict(total)

    def _check_bad(self) -> None:
        stats = self.skip_stats()
        seen = stats.get("seen", 0)
        bad = sum(v for k, v in stats.items() if k.startswith("bad: "))
        if seen >= self.cfg.min_samples_for_check and bad > self.cfg.max_bad_fraction * seen:
            reasons = ", ".join(f"{k[5:]}: {v}" for k, v in sorted(stats.items()) if k.startswith("bad: "))
            raise TooManyBadSamples(
                f"{bad} of {seen} samples on rank {self.rank} are bad ({reasons}); above "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}. Check the shards with "
                "data_tools/verify_shards.py --decode")

    def close(self) -> None:
        self._loader = None
