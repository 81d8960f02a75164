"""Checkpoints: the DeepSpeed checkpoint (weights, optimiser, any ZeRO stage) plus, per rank, the data-loader
state and RNG states, so that a resumed run continues with the same samples and the same randomness."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rng_states() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def save(engine, folder: Path, step: int, client: dict[str, Any], rank_state: dict[str, Any], keep_last: int) -> str:
    """All ranks call this. Rank files go in first; DeepSpeed writes the ``latest`` pointer last."""
    tag = tag_of(step)
    rank = dist.get_rank()
    (folder / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, folder / tag / f"accord_rank{rank:05d}.pt")
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=tag, client_state=client)
    dist.barrier()
    if rank == 0 and keep_last > 0:
        tags = sorted(p.name for p in folder.glob("step*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(folder / old, ignore_errors=True)
    return tag


def latest_tag(folder: Path) -> str | None:
    pointer = folder / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def load(engine, folder: Path, tag: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``tag`` (default: latest) into the engine; returns (client state, this rank's state)."""
    tag = tag or latest_tag(folder)
    if tag is None or not (folder / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or 'latest'} in {folder}")
    path, client = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
    rank_file = folder / tag / f"accord_rank{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} is missing: resume needs the same world size as the saved run")
    return client, torch.load(rank_file, weights_only=False)
