"""A node-local cache of remote shards (``data.cache_dir``, ``data.cache_limit``), shared by the node's ranks and
data workers.

A remote shard (a URL or a ``pipe:`` command) is downloaded whole into the cache once (through
:func:`accord.data.shardio.open_shard`, so with its retries), to a temporary name then renamed, and read from there
while it stays; the next shard of each slot is downloaded in the background while the current one is read. Who
does what is decided by ``flock`` on one lock file per shard, which the kernel releases when a process dies (no
stale state after a SIGKILL): a download holds it exclusively, a reader shared, and eviction takes it exclusively
without waiting, so a shard being read or written is never evicted. When adding a shard would pass the limit, the
least recently used shards that no one holds go first; when those are not enough, the read fails naming
``data.cache_limit`` (the limit must hold every shard in flight: MosaicML Streaming's deadlock, their issue 417).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import posixpath
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import fsspec

from accord.config import ConfigError
from accord.data.shardio import IOPolicy, ShardUnreadable, open_shard
from accord.data.shardlists import shard_token


def check_limit(limit: int, urls: Iterable[str], slots_on_node: int, looked_at: int = 8) -> None:
    """Refuse (ConfigError naming data.cache_limit) a limit that cannot hold the shards in flight on this node: the
    one each data worker reads and the one it downloads ahead, sized by the largest of the first ``looked_at``
    remote URLs (``pipe:`` shards have no size to ask for: checked as they come)."""
    sizes = []
    for url in itertools.islice((u for u in urls if not u.startswith("pipe:")), looked_at):
        with contextlib.suppress(Exception):  # a shard that cannot be asked about fails when it is read
            fs, path = fsspec.core.url_to_fs(url)
            sizes.append(int(fs.info(path)["size"]))
    if not sizes:
        return
    need = 2 * slots_on_node * max(sizes)
    if limit < need:
        raise ConfigError(
            f"data.cache_limit: {limit} bytes cannot hold the shards in flight on this node: 2 per data worker x "
            f"{slots_on_node} workers x {max(sizes)} bytes (the largest of {len(sizes)} shards looked at) = {need}"
        )


class CacheFull(ShardUnreadable):
    """Adding a shard would pass ``data.cache_limit`` and every cached shard is in use."""


class ShardCache:
    """See the module docstring. ``limit`` in bytes (None: no limit)."""

    def __init__(self, folder: str | Path, limit: int | None, policy: IOPolicy):
        self.folder, self.limit, self.policy = Path(folder), limit, policy
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        """Where ``url`` is cached: a hash of the URL (or command), then the shard's file name."""
        digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
        word = (shard_token(url[5:]) or "shard.tar") if url.startswith("pipe:") else url
        name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(word))
        return self.folder / f"{digest}-{name[-80:]}"

    def open(self, url: str, on_retry: Callable[[], None] | None = None) -> _HeldFile:
        """The cached copy of ``url`` (downloaded first when absent), held against eviction until closed.

        Two locks per shard: ``.hold`` (shared while a process uses the shard, taken exclusively to evict it) and
        ``.fetch`` (exclusive while one process downloads it; the others wait for it, then read the copy)."""
        path = self.path(url)
        hold = open(f"{path}.hold", "a")
        try:
            fcntl.flock(hold, fcntl.LOCK_SH)
            if not path.exists():
                with open(f"{path}.fetch", "a") as fetch:
                    fcntl.flock(fetch, fcntl.LOCK_EX)
                    if not path.exists():
                        self._download(url, path, on_retry)
            os.utime(path)  # least recently used goes first
            return _HeldFile(path, hold)
        except BaseException:
            hold.close()
            raise

    def prefetch(self, url: str, on_retry: Callable[[], None] | None = None) -> threading.Thread:
        """Download ``url`` into the cache in a daemon thread (nothing when it is there or being downloaded)."""

        def run() -> None:
            path = self.path(url)
            with open(f"{path}.fetch", "a") as fetch:
                try:
                    fcntl.flock(fetch, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # being downloaded
                if not path.exists():
                    with contextlib.suppress(Exception):  # the reader meets (and reports) the same fault
                        self._download(url, path, on_retry)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _download(self, url: str, path: Path, on_retry: Callable[[], None] | None) -> None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open_shard(url, self.policy, on_retry) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            self.make_room(tmp.stat().st_size, keep=path)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def cached(self) -> list[Path]:
        """The complete shards in the cache (not the lock files, not downloads under way)."""
        return [p for p in self.folder.iterdir() if p.suffix not in (".hold", ".fetch") and ".tmp-" not in p.name]

    def make_room(self, incoming: int, keep: Path) -> None:
        """Evict least recently used shards no one holds until ``incoming`` more bytes fit under the limit."""
        if self.limit is None:
            return
        entries = []
        for p in self.cached():
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        used = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if used + incoming <= self.limit:
                return
            if p == keep:
                continue
            with open(f"{p}.hold", "a") as hold:
                try:
                    fcntl.flock(hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being read or written
                if p.exists():
                    p.unlink()
                    used -= size
        if used + incoming > self.limit:
            raise CacheFull(
                f"data.cache_limit={self.limit} bytes cannot hold {incoming} more: {used} bytes of shards in use in "
                f"{self.folder}. The limit must hold the shards in flight (2 per data worker of every rank of the node)"
            )


class _HeldFile:
    """A cached shard opened for reading, with its shared ``.hold`` lock (released at close)."""

    def __init__(self, path: Path, hold: IO[str]):
        self._file: Any = open(path, "rb")
        self._lock = hold

    def read(self, n: int = -1) -> bytes:
        return self._file.read(n)

    def close(self) -> None:
        self._file.close()
        self._lock.close()

    def __enter__(self) -> _HeldFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
