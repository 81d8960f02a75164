"""Object storage that fails, on 127.0.0.1: a static HTTP server with range reads, and a TCP proxy in front of it
that injects faults per request (a connection reset after N bytes, a stall, a refused connection)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder (HTTP/1.0: one request per connection) with ``Range: bytes=a-b``; counts GETs per path."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.gets[self.path] += 1  # type: ignore[attr-defined]
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        first, _, last = spec.removeprefix("bytes=").partition("-")
        start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start : end + 1])


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client (or the proxy) dropping the connection
        pass


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[ThreadingHTTPServer]:
    """Serve ``folder`` on 127.0.0.1 (a free port) until the block ends; ``server.gets`` counts GETs per path."""
    server = QuietServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    server.gets = Counter()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Fault:
    kind: str  # "reset" (RST after `after` response bytes), "stall" (no byte after `after`), "refuse" (RST at once)
    after: int = 0


Plan = Callable[[str, str, int], "Fault | None"]  # (method, path, n-th request of that path, from 1) -> fault


class FaultProxy:
    """Forwards 127.0.0.1:port to an HTTP server (an S3 one too), one request per connection (``Connection: close``),
    faults chosen by ``plan``."""

    def __init__(self, upstream: tuple[str, int], plan: Plan):
        self.upstream, self.plan = upstream, plan
        self.requests: Counter = Counter()
        self.faults: Counter = Counter()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):  # either side dropping the connection ends this one, as it should
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            method, path = head.split(b" ", 2)[:2]
            with self._lock:
                self.requests[path.decode()] += 1
                fault = self.plan(method.decode(), path.decode(), self.requests[path.decode()])
                if fault is not None:
                    self.faults[fault.kind] += 1
            if fault is not None and fault.kind == "refuse":
                return reset(client)
            with socket.create_connection(self.upstream) as up:
                up.sendall(one_request(head))
                sent = 0
                while True:
                    data = up.recv(65536)
                    if not data:
                        return
                    if fault is not None and sent + len(data) > fault.after:
                        client.sendall(data[: fault.after - sent])
                        if fault.kind == "stall":
                            self.closed.wait()
                        return reset(client)
                    client.sendall(data)
                    sent += len(data)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


def one_request(head: bytes) -> bytes:
    """The request head with ``Connection: close``: the upstream closes after its response (one per connection)."""
    top, _, rest = head.partition(b"\r\n")
    lines = [line for line in rest.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([top, b"Connection: close", *lines])


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def first_get_of_each_shard(kind: str, fraction: float, folder: Path) -> Plan:
    """A fault on the first GET of every .tar, ``fraction`` of the way into its bytes (headers included)."""
    gets: Counter = Counter()

    def plan(method: str, path: str, _nth: int) -> Fault | None:
        if method != "GET" or not path.endswith(".tar"):
            return None
        gets[path] += 1
        return Fault(kind, int(os.path.getsize(folder / path.lstrip("/")) * fraction)) if gets[path] == 1 else None

    return plan


def first_request_of_each_shard_refused(method: str, path: str, nth: int) -> Fault | None:
    """The first connection for every .tar (a HEAD or a GET) dropped at once."""
    return Fault("refuse") if path.endswith(".tar") and nth == 1 else None
