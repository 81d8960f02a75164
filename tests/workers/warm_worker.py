"""Run as a script: do processes started from the forkserver find data workers' imports done? Prints JSON.

argv: a shards folder. ``warm_workers`` runs first, as training does; a process forked from the forkserver that the
DataLoader's workers fork from reports which of the slow imports it inherited (the forkserver is a fresh
interpreter: it has them only if it preloaded them, and this process never imports them itself); then a loader's
workers, started from it, read every sample. (The time it saves: bench/startup.py.)
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accord.data.loader import VIDEO_IMPORTS, WORKER_IMPORTS, Loader, warm_workers  # noqa: E402
from accord.modalities import MODALITIES  # noqa: E402

from helpers.tiny import data_config  # noqa: E402

SLOW = [*WORKER_IMPORTS.values(), VIDEO_IMPORTS["decord"]]


def inherited(queue) -> None:  # noqa: ANN001
    queue.put([m for m in SLOW if m in sys.modules])


if __name__ == "__main__":
    shards = sys.argv[1]
    cfg = data_config(shards, val=shards, workers=1, persistent_workers=False, start_method="forkserver")
    warm_workers(cfg, MODALITIES)
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    child = ctx.Process(target=inherited, args=(queue,))
    child.start()
    found = queue.get(timeout=120)
    child.join()
    keys = [k for batch in Loader(cfg, MODALITIES, train=False, rank=0, world=1) for k in batch["__key__"]]
    parent = [m for m in SLOW[:1] if m in sys.modules]  # the tokenizer module: loaded by workers only
    print(json.dumps({"inherited": found, "samples": len(keys), "parent": parent}), flush=True)
