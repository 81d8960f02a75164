"""Checkpoints: the DeepSpeed checkpoint (weights, optimiser, any ZeRO stage) plus, per rank, the data-loader state
and RNG states, so that a resumed run continues with the same samples and the same randomness.

A checkpoint counts only once it is whole: every rank writes its files and fsyncs them, then rank 0 writes
``accord.json`` (what the run looked like: step, world size, data workers, ZeRO stage) into the tag's folder and
only then moves the ``latest`` pointer, each by an atomic rename. A run killed while writing leaves ``latest`` on the
previous checkpoint, and a folder without ``accord.json`` is never loaded. The checkpoint ``latest`` names is never
rewritten (a resumed run saves nothing at the step it resumed from).

Resuming on another world size (same ZeRO stage, 1 or 2) goes through DeepSpeed's universal checkpoint: rank 0
converts the tag once (``ds_to_universal``, into ``universal/<tag>``) and every rank loads its new partition of the
weights and the optimiser moments from it. The data loader merges the states of all saved ranks (see
``accord.data.loader``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from accord import collectives
from accord.config import ConfigError
from accord.train.config import CheckpointConfig

MARKER = "accord.json"
UNIVERSAL = "universal"


def rng_states() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values only (the rank file loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a folder (its entries)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def save(
    engine,
    folder: Path,
    step: int,
    client: dict[str, Any],
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> str:
    """All ranks call this. Rank files and DeepSpeed's files first; then rank 0 commits (marker, ``latest``)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = tag_of(step)
    rank = dist.get_rank()
    if rank == 0 and latest_tag(folder) == tag and (folder / tag / MARKER).exists():
        # Rewriting it would delete the only checkpoint ``latest`` names until the new one is committed.
        raise RuntimeError(f"checkpoint {folder / tag} is the latest one and would be overwritten")
    if rank == 0:  # a later tag of an abandoned run (resumed from an earlier one) starts empty: no stale rank files
        shutil.rmtree(folder / tag, ignore_errors=True)
        shutil.rmtree(folder / UNIVERSAL / tag, ignore_errors=True)
        (folder / tag).mkdir(parents=True)
    collectives.barrier()
    torch.save(rank_state, folder / tag / f"accord_rank{rank:05d}.pt")
    client = {
        **client,
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    engine.save_checkpoint(str(folder), tag=tag, client_state=client, save_latest=False)  # ends in a barrier
    _fsync_tree(folder / tag)  # every rank (each node's own writes): on disk before the marker says it is whole
    collectives.barrier()
    if rank == 0:
        _write_atomic(folder / tag / MARKER, json.dumps({"tag": tag, "step": step, **meta}, indent=1))
        _write_atomic(folder / "latest", tag)
        # Tags after this one are of a run this one replaced (started afresh, or resumed from an earlier step, in
        # the same output_dir): another history, which keep_last must not count nor keep over this run's own.
        later = [p.name for p in folder.glob("step*") if p.is_dir() and p.name > tag]
        for old in later:
            shutil.rmtree(folder / old, ignore_errors=True)
            shutil.rmtree(folder / UNIVERSAL / old, ignore_errors=True)
        if later:
            print(f"removed {len(later)} checkpoint(s) after {tag} of a replaced run: {', '.join(sorted(later))}")
        if keep_last > 0:
            committed = sorted(p.name for p in folder.glob("step*") if (p / MARKER).exists())
            stale = committed[:-keep_last] + [
                p.name for p in folder.glob("step*") if p.is_dir() and not (p / MARKER).exists() and p.name < tag
            ]
            for old in stale:
                shutil.rmtree(folder / old, ignore_errors=True)
                shutil.rmtree(folder / UNIVERSAL / old, ignore_errors=True)
    collectives.barrier()
    return tag


def resolve(folder: Path, tag: str | None) -> dict[str, Any]:
    """The metadata (``accord.json``) of ``tag``, or of the ``latest`` one; errors name what is missing."""
    if tag is None or tag == "latest":
        tag = latest_tag(folder)
        if tag is None:
            raise FileNotFoundError(
                f"{folder / 'latest'}: no such file, so no committed checkpoint in {folder} (is the folder right?)"
            )
    marker = folder / tag / MARKER
    if not (folder / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} in {folder}")
    if not marker.exists():
        raise FileNotFoundError(
            f"checkpoint {folder / tag} is incomplete (no {MARKER}): it was being written "
            "when its run stopped; resume from an earlier tag"
        )
    return json.loads(marker.read_text())


def needs_universal(meta: dict[str, Any], world: int, zero_stage: int) -> bool:
    """Whether resuming the checkpoint ``meta`` describes on ``world`` ranks at ``zero_stage`` loads its universal
    form; raises ConfigError for what DeepSpeed 0.19.8 cannot do here."""
    if meta["zero_stage"] != zero_stage:
        raise ConfigError(
            f"deepspeed.zero_stage: the checkpoint was saved at stage {meta['zero_stage']}; resume it at the same stage"
        )
    elastic = meta["world"] != world and zero_stage > 0  # stage 0 holds whole weights and moments: loads as is
    if elastic and zero_stage == 3:
        raise ConfigError(
            f"deepspeed.zero_stage: a resume of a ZeRO-3 checkpoint on another world size is not supported (with "
            f"DeepSpeed 0.19.8 its parameter tracing fails a few steps after the universal load); resume it on "
            f"{meta['world']} ranks (ZeRO 0-2 resume on any world size)"
        )
    return elastic


def repartition_after_load(engine: Any) -> None:
    """ZeRO-3: a checkpoint load leaves parameters gathered, and the module order traced on the first step then
    differs from later steps' (a resumed run failed its third step with "tracing error at step 0"): partition
    every parameter again before training."""
    if getattr(engine.optimizer, "parameter_offload", None) is not None:
        engine.empty_partition_cache()


def point_latest_at(folder: Path, tag: str) -> None:
    """Rank 0, on resume: the run continues from ``tag``, so ``latest`` names it until the next save (a later tag
    of the abandoned run may be rewritten, and must not stay ``latest`` meanwhile)."""
    if dist.get_rank() == 0 and latest_tag(folder) != tag:
        _write_atomic(folder / "latest", tag)


def latest_tag(folder: Path) -> str | None:
    pointer = folder / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def prepare_universal(folder: Path, tag: str) -> Path:
    """All ranks call this: rank 0 converts ``tag`` to a universal checkpoint once (kept for later resumes);
    returns the folder to pass to ``engine.load_checkpoint`` with that tag."""
    target = folder / UNIVERSAL
    error = None
    if dist.get_rank() == 0 and not (target / tag / MARKER).exists():
        tmp = target / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(folder / tag),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            error = f"converting {folder / tag} to a universal checkpoint failed: {last}"
        else:
            shutil.rmtree(target / tag, ignore_errors=True)
            os.replace(tmp, target / tag)
            shutil.copy(folder / tag / MARKER, target / tag / MARKER)
    error = collectives.broadcast_object(error)
    if error:
        raise RuntimeError(error)
    return target


def load(engine, folder: Path, meta: dict[str, Any], universal: bool) -> tuple[dict[str, Any], list[dict]]:
    """Load the checkpoint ``meta`` describes into the engine (through its universal form when ``universal``);
    returns (client state, the per-rank states of *every* saved rank, in rank order)."""
    tag = meta["tag"]
    load_dir = prepare_universal(folder, tag) if universal else folder
    path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    point_latest_at(folder, tag)
    repartition_after_load(engine)
    files = [folder / tag / f"accord_rank{r:05d}.pt" for r in range(meta["world"])]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {folder / tag} lacks {', '.join(missing)} (saved by {meta['world']} "
            "ranks): the folder must be shared by all nodes"
        )
    return client, [torch.load(f, weights_only=True) for f in files]  # plain data: see rng_states


class Checkpointer:
    """The run's checkpoints in ``folder``: :func:`save` / :func:`load` with the engine, and the saving policy."""

    def __init__(self, engine: Any, folder: Path, cfg: CheckpointConfig):
        self.engine, self.folder, self.cfg = engine, folder, cfg
        self.saved_at: int | None = None

    def should_save(self, step: int, total_steps: int, last: bool = False) -> bool:
        """Every ``checkpoint.every`` steps before the end (``last=False``); at the end of the run (``last=True``)
        unless that step was just saved."""
        if last:
            return self.saved_at != step
        return step % self.cfg.every == 0 and step < total_steps

    def save(self, step: int, client: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> str:
        tag = save(self.engine, self.folder, step, client, rank_state, meta, self.cfg.keep_last)
        self.saved_at = step
        return tag

    def load(self, meta: dict[str, Any], universal: bool) -> tuple[dict[str, Any], list[dict]]:
        client, states = load(self.engine, self.folder, meta, universal)
        self.saved_at = meta["step"]  # on disk already: a resumed run that trains no further step saves nothing
        return client, states
