"""Blocks of a shared-folder build (``--num-nodes``) claimed as nodes get to them, so that live nodes take over the
blocks of a node that died.

A node claims block N by creating its ``block-N.claim`` (:mod:`accord.shards.staging`) exclusively (a hard link of the
written claim: one creator wins), and keeps its claims alive by touching them every ``timeout_s / 4`` seconds while its
workers convert them; the block's commit record ``block-N.json`` marks it done. A claim untouched for ``timeout_s``
seconds is a dead (or hung) node's: a node takes it over by renaming it away (one rename wins) and claiming the block
afresh. A claim left by an earlier process of the same node rank (a node killed and started again) is taken over at
once. Every node starts with its own share (blocks ``node_rank``, ``node_rank + num_nodes``, ...) and then takes
whatever no one holds, so a fast node also converts a slow node's blocks. Two nodes converting one block (a claim taken
from a node that was only slow) write the same bytes, each under its own temporary names.

The shared folder must be a POSIX file system (local disk, NFS, Lustre: what SLURM arrays share); the staleness test
compares file times with this machine's clock, so node clocks must agree to well within ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator

import fsspec

from accord.shards.staging import UNITS, done_glob, unit_path


class BlockClaims:
    """The claims of one node process over ``n_blocks`` blocks in ``staging`` (on ``fs``), or over the final shards
    with ``kind="shard"`` (the same protocol; a shard is done once its ``.done`` marker exists). With one node
    nothing is claimed (every block not yet committed is this node's) and any fsspec file system serves; with
    several, ``staging`` is a local path of the shared folder."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        staging: str,
        n_blocks: int,
        num_nodes: int,
        node_rank: int,
        timeout_s: float,
        kind: str = "block",
    ):
        self.fs, self.staging, self.n_blocks, self.kind = fs, staging, n_blocks, kind
        self.num_nodes, self.node_rank, self.timeout_s = num_nodes, node_rank, timeout_s
        self.token = uuid.uuid4().hex  # this process
        self.held: set[int] = set()
        self.taken_over: set[int] = set()  # blocks this process took from another node's claim
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if num_nodes > 1:
            threading.Thread(target=self._heartbeat, name="accord-build-claims", daemon=True).start()

    def path(self, block: int) -> str:
        return unit_path(self.staging, self.kind, block, "claim")

    def done(self, block: int) -> bool:
        return self.fs.exists(unit_path(self.staging, self.kind, block, UNITS[self.kind][1]))

    def owner(self, block: int) -> dict | None:
        """The claim on ``block`` ({"node", "token"}), or None when no one holds it."""
        try:
            with open(self.path(block)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):  # released meanwhile, or being written this instant
            return None

    def stale(self, block: int) -> bool:
        """Whether the claim on ``block`` is a dead node's: untouched for ``timeout_s``, or left by an earlier
        process of this node rank."""
        owner = self.owner(block)
        if owner is not None and owner.get("node") == self.node_rank and owner.get("token") != self.token:
            return True
        try:
            return time.time() - os.stat(self.path(block)).st_mtime > self.timeout_s
        except FileNotFoundError:
            return False

    def claimable(self, block: int) -> bool:
        """Whether no live node holds ``block``'s claim (none exists, or it is stale)."""
        return not os.path.exists(self.path(block)) or self.stale(block)

    def claim(self, block: int) -> bool:
        """Claim ``block`` if no live node holds it and it is not done; True when this process now holds it."""
        if self.done(block):
            return False
        if self.num_nodes == 1:
            return True
        took = False
        if os.path.exists(self.path(block)):
            if not self.stale(block):
                return False
            try:  # one rename wins; the losers see the file gone
                os.rename(self.path(block), f"{self.path(block)}.{self.token}.stale")
            except FileNotFoundError:
                return False
            os.remove(f"{self.path(block)}.{self.token}.stale")
            took = True
        # Written whole, then linked into place: link() fails when the claim exists (one creator wins, as with
        # O_EXCL), and no one ever reads a claim half written, even of a node killed while claiming.
        tmp = f"{self.path(block)}.{self.token}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"node": self.node_rank, "token": self.token, "pid": os.getpid()}, f)
            os.link(tmp, self.path(block))
        except FileExistsError:
            return False
        except FileNotFoundError:  # no staging folder: node 0 has packed the build and removed it
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if self.done(block):  # committed by its old owner between our checks
            os.remove(self.path(block))
            return False
        with self._lock:
            self.held.add(block)
        if took:
            self.taken_over.add(block)
        return True

    def release(self, block: int) -> None:
        """The block is committed: drop the claim."""
        if self.num_nodes == 1:
            return
        with self._lock:
            self.held.discard(block)
        try:
            os.remove(self.path(block))
        except FileNotFoundError:
            pass

    def candidates(self) -> Iterator[int]:
        """Blocks in the order this node tries them: its own share first, then the others."""
        mine = range(self.node_rank, self.n_blocks, self.num_nodes)
        yield from mine
        yield from (b for b in range(self.n_blocks) if b % self.num_nodes != self.node_rank)

    def missing(self) -> list[int]:
        """The blocks not committed yet (listed once, not asked one by one)."""
        self.fs.invalidate_cache(self.staging)
        done = {p.rsplit("/", 1)[-1] for p in self.fs.glob(done_glob(self.staging, self.kind))}
        suffix = UNITS[self.kind][1]
        return [b for b in range(self.n_blocks) if f"{self.kind}-{b:06d}.{suffix}" not in done]

    def holders(self, blocks: list[int]) -> dict[str, list[int]]:
        """Who holds each of ``blocks``: "node R" or "no one"."""
        out: dict[str, list[int]] = {}
        for b in blocks:
            owner = self.owner(b)
            out.setdefault(f"node {owner['node']}" if owner else "no one", []).append(b)
        return out

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            with self._lock:
                held = list(self.held)
            for b in held:
                try:
                    os.utime(self.path(b))
                except FileNotFoundError:  # taken over (we were thought dead) or released
                    pass

    def close(self) -> None:
        """Stop the heartbeat (claims still held go stale, for another node to take over)."""
        self._stop.set()


def stale_heartbeat(beat: str, waiting_since: float, timeout_s: float) -> bool:
    """Whether the heartbeat file ``beat`` (see :func:`heartbeat`) is older than ``timeout_s``, or has been absent that
    long since ``waiting_since``."""
    try:
        last = os.stat(beat).st_mtime
    except FileNotFoundError:
        last = waiting_since
    return time.time() - last > timeout_s


@contextlib.contextmanager
def heartbeat(path: str | None, timeout_s: float) -> Iterator[None]:
    """Touch ``path`` every ``timeout_s / 4`` seconds while the body runs (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with open(path, "a"):
                pass
            os.utime(path)
            if stop.wait(timeout_s / 4):
                return

    thread = threading.Thread(target=beat, name="accord-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
