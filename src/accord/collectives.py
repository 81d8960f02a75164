"""Every collective accord runs itself, on the device its process group's backend takes.

NCCL takes CUDA tensors only, gloo CPU ones; a collective handed a tensor on another device fails ("No backend type
associated with device type cpu"), on one GPU as on many. Accord's own collectives (lock-step batches, loss
normalisers, the non-finite check, logged stats) start from small CPU tensors, so each goes through this module:
the tensor is moved to :func:`collective_device` for the collective and handed back on the caller's device. Nothing
else in ``src/accord`` calls a ``torch.distributed`` collective (``tests/test_collectives.py`` checks the source,
and a 2-rank training run that every collective of a step, an evaluation and a save came through here).

Every function is the identity (or a no-op) without a process group, so single-process code calls them freely.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch
import torch.distributed as dist

Op = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def active() -> bool:
    """A process group of more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend_devices() -> list[str]:
    """The device types the default group's backend takes: ``["cpu"]`` (gloo), ``["cuda"]`` (NCCL), both for a
    ``cpu:gloo,cuda:nccl`` group; ``["cpu"]`` without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return ["cpu"]
    return [part.split(":")[0] for part in dist.get_backend_config().split(",")]


def collective_device() -> torch.device:
    """Where accord's collectives run: the CPU when the backend takes it, else this rank's current accelerator
    (set from ``LOCAL_RANK`` by ``accord.train.distributed.init_distributed``)."""
    types = backend_devices()
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    return torch.device(kind, torch.get_device_module(kind).current_device())


def local_device_index(local_rank: int, device_count: int) -> int:
    """The accelerator a rank uses: its ``LOCAL_RANK``, or index 0..count-1 of the devices it can see when the
    launcher gave each process fewer (SLURM ``--gpus-per-task=1`` shows each task one GPU, as device 0)."""
    if device_count < 1:
        raise RuntimeError("no accelerator is visible to this process")
    return local_rank if local_rank < device_count else local_rank % device_count


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    return t.to(collective_device()).contiguous()


def all_reduce(t: torch.Tensor, op: Op = "sum") -> torch.Tensor:
    """``t`` reduced over every rank (a new tensor on ``t``'s device; ``t`` is left as it was)."""
    if not active():
        return t.clone()
    x = t.to(collective_device(), copy=True)  # one copy, wherever t lives
    dist.all_reduce(x, op=_OPS[op])
    return x.to(t.device)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (equal shapes), in rank order, on ``t``'s device."""
    if not active():
        return [t]
    x = _on_backend(t)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return [p.to(t.device) for p in parts]


def global_max(value: int) -> int:
    """The largest ``value`` over ranks."""
    return int(all_reduce(torch.tensor([value]), "max").item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (on the backend's device: NCCL's barrier runs on the current GPU)."""
    if not active():
        return
    device = collective_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------------ audit
AUDIT_ENV = "ACCORD_CHECK_COLLECTIVES"  # "1": :func:`install_audit` at process-group start (the tests set it)
AUDITED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


class CollectiveMisuse(RuntimeError):
    """A collective got a tensor on a device its backend cannot take, or accord code bypassed this module."""


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def install_audit() -> None:
    """Wrap ``torch.distributed``'s collectives so that each call checks (1) every tensor it is given is on a device
    type the default group's backend takes, (2) a caller inside ``accord`` is this module; a violation raises
    :class:`CollectiveMisuse` naming the caller, instead of NCCL's "No backend type associated with device type cpu"
    deep in a step (or nothing at all on a CPU machine, where gloo takes every tensor). DeepSpeed's and torch's own
    calls are checked for devices only. Idempotent."""
    for name in AUDITED:
        original = getattr(dist, name)
        if getattr(original, "_accord_audited", False):
            continue

        def audited(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            if caller.startswith("accord.") and caller != __name__:
                raise CollectiveMisuse(
                    f"{caller} called torch.distributed.{__name} directly: accord's collectives go through "
                    f"{__name__} (which puts their tensors on the backend's device)"
                )
            takes = backend_devices()
            tensors = [] if "object" in __name else _tensors(list(args) + list(kwargs.values()))  # objects: pickled
            for t in tensors:
                if t.device.type not in takes:
                    raise CollectiveMisuse(
                        f"{caller} handed torch.distributed.{__name} a tensor on {t.device}, but the process group's "
                        f"backend ({dist.get_backend_config()}) takes {', '.join(takes)} tensors only"
                    )
            return __original(*args, **kwargs)

        audited._accord_audited = True  # type: ignore[attr-defined]
        audited.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(dist, name, audited)
