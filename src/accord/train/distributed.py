"""Process-group setup for training: the launcher's environment (or one process when started plainly), where each
rank runs (node facts), and a heartbeat that names the rank that was lost or stalled when a collective fails."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from accord import collectives, verbosity

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU backend JIT-builds (torch cpp_extension) in its init
BUILD_LOCK_STALE_S = 300.0  # that build takes ~20 s on 2 cores: a lock older than this is a killed build's


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Join the process group the launcher describes (or a one-process group) through DeepSpeed.

    On an accelerator, the rank's device is set from ``LOCAL_RANK`` first (DeepSpeed, NCCL and accord's
    collectives all use the current device). ``timeout_s`` bounds every collective (gloo and NCCL alike), in the
    default group and in every group made later (DeepSpeed runs ZeRO's reductions in its own groups, which
    ``new_group`` would give torch's 30-minute default): a rank that dies or stalls makes the others fail after at
    most that long instead of waiting.

    On CPU, DeepSpeed's shared-memory all-reduce maps a 66 MB file per rank in /dev/shm and never unlinks it, so
    every multi-rank run would leave RAM behind for good. Once every rank has mapped its peers' files, each rank
    unlinks its own: the mappings live on until the processes exit, even when they are killed.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        backend = "gloo"
    else:  # before anything touches the device or NCCL: every rank on its own GPU, not all on cuda:0
        backend = accelerator.communication_backend_name()
        local_rank = int(os.environ["LOCAL_RANK"])
        accelerator.set_device(collectives.local_device_index(local_rank, accelerator.device_count()))
    if os.environ.get(collectives.AUDIT_ENV) == "1":
        collectives.install_audit()
    if accelerator.device_name() == "cpu":
        clear_stale_build_lock()
    timeout = timedelta(seconds=timeout_s)
    c10d = dist.distributed_c10d  # new_group(timeout=None) reads these defaults at call time
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    with contextlib.redirect_stdout(io.StringIO()) if not verbosity.is_verbose() else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)  # prints "... built"
    if accelerator.device_name() == "cpu":  # the shm all-reduce is DeepSpeed's CPU backend only
        release_shm_workspace()


def shm_op_build_locks() -> list[Path]:
    """Where torch's extension builder puts the lock file of DeepSpeed's shm op (one build folder per Python/CUDA)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [Path(root) / SHM_OP / "lock"]
    return sorted(Path(get_default_build_root()).glob(f"*/{SHM_OP}/lock"))


def clear_stale_build_lock(stale_after_s: float = BUILD_LOCK_STALE_S, poll_s: float = 1.0) -> None:
    """Wait out a running build of DeepSpeed's shm op; remove the lock a killed one left.

    Every process that starts DeepSpeed on CPU takes torch's build lock (a bare file) for a moment, even when the op
    is built; a process killed while holding it (a timeout, SIGKILL, a lost node) leaves the file, and every later
    run on the machine waits on it forever, printing nothing. A lock younger than ``stale_after_s`` may be a live
    build and is waited for; an older one is removed, with a line saying so.
    """
    for lock in shm_op_build_locks():
        waited = False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age > stale_after_s:
                lock.unlink(missing_ok=True)
                line = f"accord: removed {lock}, left {age:.0f} s ago by a build of {SHM_OP} that never finished"
                print(line, file=sys.stderr)
                break
            if not waited:
                print(f"accord: waiting for a build of {SHM_OP} ({lock}, {age:.0f} s old)", file=sys.stderr)
                waited = True
            time.sleep(poll_s)


def build_shm_op() -> None:
    """Build DeepSpeed's CPU shm op now (``launch/setup.sh`` calls this), past a stale lock, so that no run or test
    pays the ~20 s first build inside its own timeout."""
    from deepspeed.comm.torch import build_shm_op as deepspeed_build_shm_op

    clear_stale_build_lock()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed_build_shm_op()


def shm_workspace_path() -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank of this job (named as in its shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shm all-reduce file after every rank has opened it (no-op where none exists)."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        collectives.barrier()  # DeepSpeed maps the peers' files inside init; after this barrier every rank has done so
    shm_workspace_path().unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- node facts
def node_info() -> dict[str, Any]:
    """Where this rank runs, from the launcher's variables (deepspeed: CROSS_RANK; torchrun: GROUP_RANK; SLURM)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    node = os.environ.get("CROSS_RANK") or os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID")
    return {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "node_rank": int(node) if node is not None else rank // local_world,
        "local_world_size": local_world,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def gather_node_info() -> list[dict[str, Any]]:
    """Every rank's :func:`node_info`, in rank order (a collective)."""
    return collectives.all_gather_object(node_info())


def describe_rank(info: dict[str, Any]) -> str:
    return (
        f"rank {info['rank']} (node {info['node_rank']}, local rank {info['local_rank']}, {info['host']} "
        f"pid {info['pid']})"
    )


# ----------------------------------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """A thread that counts up ``accord/heartbeat/<rank>`` in the rendezvous store once per ``interval_s``.

    It runs beside the training thread, so a rank blocked in a collective still beats, while a rank that died or
    was stopped (SIGSTOP, a hung file system) does not. When a collective fails, :meth:`silent_ranks` tells which
    ranks stopped beating; counters need no synchronised clocks across nodes.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._stop = threading.Event()
        self._store = self._connect()
        self._thread = threading.Thread(target=self._run, name="accord-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(timeout_s: float = 5.0) -> dist.TCPStore:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    def _run(self) -> None:
        key = f"accord/heartbeat/{self.rank}"
        while not self._stop.is_set():
            try:
                self._store.add(key, 1)
            except Exception:  # the store's host is gone: nothing left to report to
                return
            self._stop.wait(self.interval_s)

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose counter did not move over three intervals; None when the store itself does not answer
        (it lives with rank 0 under the deepspeed launcher, with the node-0 agent under torchrun)."""
        try:
            store = self._connect()
            keys = [f"accord/heartbeat/{r}" for r in range(self.world)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(3 * self.interval_s)
            after = [store.add(k, 0) for k in keys]
        except Exception:
            return None
        return [r for r, (b, a) in enumerate(zip(before, after, strict=True)) if a == b and r != self.rank]

    def report_stop(self, reason: str) -> None:
        """This rank stops on its own (its data stalled, too many bad samples): tell the others why, so that they
        do not blame the network (they read it in :meth:`stopped_ranks`)."""
        try:
            self._connect().set(f"accord/stopped/{self.rank}", reason)
        except Exception:  # the store's host is gone: the others will find this rank silent instead
            pass

    def stopped_ranks(self) -> dict[int, str]:
        """The other ranks that stopped on their own, with their reasons."""
        try:
            store = self._connect()
            keys = {r: f"accord/stopped/{r}" for r in range(self.world) if r != self.rank}
            return {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}
        except Exception:
            return {}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------- lost ranks
LOST_RANK_EXIT = 3  # exit status of a rank whose collective failed because another rank died or stalled


def is_comm_failure(error: BaseException) -> bool:
    """A collective that failed or timed out (gloo / NCCL), as opposed to an error in accord's own code."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


def report_lost_ranks(
    error: BaseException, heartbeat: Heartbeat, nodes: list[dict[str, Any]], step: int, timeout_s: float
) -> str:
    """One line: this rank, the failed collective, and which ranks stopped beating (lost or stalled)."""
    me = describe_rank(nodes[heartbeat.rank])
    cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    stopped = heartbeat.stopped_ranks()
    silent = heartbeat.silent_ranks() if not stopped else []
    if stopped:
        culprit = "; ".join(f"{describe_rank(nodes[r])} stopped: {m}" for r, m in stopped.items())
    elif silent is None:
        culprit = f"{describe_rank(nodes[0])} holds the rendezvous store and does not answer: lost or stalled"
    elif silent:
        culprit = "not responding (lost or stalled): " + "; ".join(describe_rank(nodes[r]) for r in silent)
    else:
        culprit = "every rank still responds: the network between them failed"
    return (
        f"accord train: {me}: a collective failed at step {step + 1} (timeout {timeout_s:g} s: {cause}); "
        f"{culprit}. Continue the run with --resume latest."
    )
