"""A shard's bytes: local files, fsspec URLs (``http(s)://``, ``s3://``, ...) and ``pipe:`` commands, read through
the faults of object storage.

Remote reads fail in ways a retry mends (a reset connection, a server that stalls, a ``pipe:`` command that exits
non-zero in the middle of a shard, a 503) and in ways it does not (a missing object, a corrupt tar). After a
transient fault the shard is reopened at the byte already read -- a range read for URLs; for ``pipe:`` the command
runs again and the bytes already read are skipped -- after an exponential backoff with jitter. So the tar parser
above sees the byte stream it would have seen without the fault: no sample is lost or read twice. A read that
delivers nothing for ``timeout_s`` is a stall, a transient fault too. Up to ``retries`` faults in a row without a
byte of progress are retried; then the read raises :class:`ShardUnreadable`, naming the shard.

Remote bytes are read by a thread one chunk ahead of the parser, so the network overlaps decoding; local files are
read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import os
import queue
import random
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import fsspec

CHUNK = 1 << 20  # bytes per read of a remote stream (and per item of its read-ahead queue)
READ_AHEAD = 4  # chunks the reader thread holds ahead of the parser
BACKOFF_CAP_S = 30.0
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"})


class TransientIOError(OSError):
    """A fault a retry may mend: a stall, a ``pipe:`` command that exited non-zero."""


class ShardUnreadable(RuntimeError):
    """A shard's retries are spent; ``message`` names the shard, the retries and the last fault (webdataset's tar
    iterator appends to ``args``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class IOPolicy:
    """How remote shards are read (``data.io_*``)."""

    retries: int = 5
    timeout_s: float = 60.0  # 0: no stall timeout
    backoff_s: float = 1.0  # the first retry's wait; doubled per fault in a row, with jitter, at most BACKOFF_CAP_S

    def backoff(self, faults: int, rng: random.Random) -> float:
        return min(BACKOFF_CAP_S, self.backoff_s * 2 ** (faults - 1)) * rng.uniform(0.5, 1.5)


def is_transient(error: BaseException) -> bool:
    """Whether a retry may mend ``error``: resets, refusals, timeouts, incomplete reads, pipe exits, HTTP 5xx / 429,
    S3's SlowDown and its kin. A missing object, a permission error or corrupt data are not."""
    if isinstance(error, (TransientIOError, ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(error, http.client.IncompleteRead):
        return True
    import aiohttp  # fsspec's HTTP file system (fsspec[http], a dependency of accord)

    if isinstance(error, aiohttp.ClientResponseError):
        return error.status in TRANSIENT_HTTP_STATUS
    if isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        return True
    try:
        from botocore import exceptions as boto  # s3fs (which retries these itself first)
    except ImportError:
        return False
    if isinstance(error, (boto.HTTPClientError, boto.ConnectionError)):  # closed, read timeout, endpoint refused
        return True
    if isinstance(error, boto.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_HTTP_STATUS or error.response.get("Error", {}).get("Code") in TRANSIENT_S3_CODES
    return False


def is_local(url: str) -> bool:
    """A path or ``file://`` URL (read directly, without retries)."""
    return not url.startswith("pipe:") and "file" in fsspec.core.url_to_fs(url)[0].protocol


def open_shard(
    url: str, policy: IOPolicy | None = None, on_retry: Callable[[], None] | None = None
) -> IO[bytes] | io.RawIOBase:
    """Binary stream of a shard: a local path, any fsspec URL or ``pipe:COMMAND``; remote ones through
    :class:`RetryingReader` with ``policy`` (``on_retry`` is called at each reopening)."""
    if is_local(url):
        return fsspec.open(url, "rb").open()
    opener = pipe_opener(url[5:]) if url.startswith("pipe:") else url_opener(url, policy or IOPolicy())
    return RetryingReader(url, opener, policy or IOPolicy(), on_retry)


# ----------------------------------------------------------------------------------------------------- openers
Opener = Callable[[int], tuple[Any, Callable[[], None], int]]  # offset -> (stream, stop(), bytes to skip first)


def url_opener(url: str, policy: IOPolicy) -> Opener:
    """Range reads from any fsspec file system (HTTP with its socket timeouts set to the stall timeout)."""
    options: dict[str, Any] = {}
    if url.startswith(("http://", "https://")) and policy.timeout_s:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout_s, sock_read=policy.timeout_s)
        options["client_kwargs"] = {"timeout": timeout}
    fs, path = fsspec.core.url_to_fs(url, **options)

    def open_at(offset: int) -> tuple[Any, Callable[[], None], int]:
        f = fs.open(path, "rb")
        if offset:
            f.seek(offset)
        return f, f.close, 0

    return open_at


def pipe_opener(command: str) -> Opener:
    """``command``'s standard output; at an offset, the command runs again and the bytes before it are skipped.
    A non-zero exit status at the end of its output is a :class:`TransientIOError` with its stderr's last line."""

    def open_at(offset: int) -> tuple[Any, Callable[[], None], int]:
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=err, bufsize=0, start_new_session=True
        )

        def stop() -> None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the shell and what it started
            proc.wait()
            err.close()

        return _PipeOutput(proc, err, command), stop, offset

    return open_at


class _PipeOutput:
    """A command's stdout whose end checks the exit status."""

    def __init__(self, proc: subprocess.Popen, err: IO[bytes], command: str):
        self.proc, self.err, self.command, self.read_bytes = proc, err, command, 0

    def read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        self.read_bytes += len(data)
        if not data and self.proc.wait() != 0:
            self.err.seek(0)
            lines = self.err.read().decode(errors="replace").strip().splitlines()
            said = f": {lines[-1]}" if lines else ""
            raise TransientIOError(
                f"pipe:{shlex.quote(self.command)[:200]} exited with status {self.proc.returncode} after "
                f"{self.read_bytes} bytes{said}"
            )
        return data


# ------------------------------------------------------------------------------------------------------ reader
class _ReadAhead:
    """One attempt: a daemon thread opens the stream at ``offset`` and queues its chunks, then b"" at the end, or the
    exception that stopped it. ``active``: when the read under way (or the opening) began."""

    def __init__(self, opener: Opener, offset: int):
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=READ_AHEAD)
        self.stopped = threading.Event()
        self.active = time.monotonic()
        self._stop: Callable[[], None] | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(opener, offset), daemon=True).start()

    def _run(self, opener: Opener, offset: int) -> None:
        try:
            stream, stop, skip = opener(offset)
            self.active = time.monotonic()
            with self._lock:
                self._stop = stop
            if self.stopped.is_set():
                stop()
                return
            while skip > 0 and not self.stopped.is_set():  # bytes already read (a re-run command): dropped
                data = stream.read(min(skip, CHUNK))
                if not data:
                    break
                skip -= len(data)
                self.active = time.monotonic()
            while not self.stopped.is_set():
                self.active = time.monotonic()  # a stall is a read that takes timeout_s, not a full queue
                data = stream.read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, which decides
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self.stopped.set()
        with self._lock:
            stop = self._stop
        if stop is not None:
            try:
                stop()
            except Exception:  # noqa: BLE001 - a broken stream being abandoned
                pass


class RetryingReader(io.RawIOBase):
    """A remote shard as a file: reopened at the byte already read after a transient fault (see module docstring)."""

    def __init__(self, url: str, opener: Opener, policy: IOPolicy, on_retry: Callable[[], None] | None = None):
        super().__init__()
        self.url, self.opener, self.policy, self.on_retry = url, opener, policy, on_retry
        self.received = 0  # bytes taken from the stream so far: where a reopened attempt starts
        self.faults = 0  # faults in a row without progress
        self._chunk, self._at, self._eof = b"", 0, False
        self._attempt: _ReadAhead | None = None
        self._rng = random.Random()

    def readable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"RetryingReader({self.url!r})"

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._at >= len(self._chunk):
            if self._eof:
                return 0
            self._next_chunk()
        n = min(len(view), len(self._chunk) - self._at)
        view[:n] = self._chunk[self._at : self._at + n]
        self._at += n
        return n

    def _next_chunk(self) -> None:
        if self._attempt is None:
            self._attempt = _ReadAhead(self.opener, self.received)
        item = self._get(self._attempt)
        if isinstance(item, bytes):
            self._chunk, self._at, self._eof = item, 0, not item
            self.received += len(item)
            self.faults = 0 if item else self.faults
            if not item:
                self._close_attempt()
            return
        self._close_attempt()
        if not is_transient(item):
            raise item
        self.faults += 1
        if self.faults > self.policy.retries:
            raise ShardUnreadable(
                f"{self.url}: unreadable after {self.policy.retries} retries (data.io_retries) at byte "
                f"{self.received}: {type(item).__name__}: {item}"
            ) from item
        if self.on_retry is not None:
            self.on_retry()
        time.sleep(self.policy.backoff(self.faults, self._rng))

    def _get(self, attempt: _ReadAhead) -> bytes | BaseException:
        """The attempt's next chunk, or a stall once it has got no byte for ``timeout_s``."""
        timeout = self.policy.timeout_s
        while True:
            try:
                return attempt.chunks.get(timeout=min(timeout, 1.0) if timeout else None)
            except queue.Empty:
                if time.monotonic() - attempt.active > timeout:
                    return TransientIOError(f"no data for {timeout:g} s (data.io_timeout_s)")

    def _close_attempt(self) -> None:
        if self._attempt is not None:
            self._attempt.stop()
            self._attempt = None

    def close(self) -> None:
        self._close_attempt()
        super().close()
