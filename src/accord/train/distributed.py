"""Process-group setup for training: the launcher's environment, or one process when started plainly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def init_distributed() -> None:
    """Join the process group the launcher describes (or a one-process group) through DeepSpeed.

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
    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    if get_accelerator().device_name() == "cpu":  # the shm all-reduce is DeepSpeed's CPU backend only
        release_shm_workspace()


def shm_workspace_path() -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank of this job (named as in its shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shm all-reduce file after every rank has opened it (no-op where none exists)."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()  # DeepSpeed maps the peers' files inside init; after this barrier every rank has done so
    shm_workspace_path().unlink(missing_ok=True)
