"""Starting real processes: free ports, the environment every launched rank gets, the deepspeed launcher command of
an ``accord.train`` run, and a run's logged metrics."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
TESTS = ROOT / "tests"
WORKERS = TESTS / "workers"
LAUNCHER = str(Path(sys.executable).parent / "deepspeed")
# every rank and worker a test starts: CPU accelerator, one thread per rank, offline, and tests/ importable (the
# worker scripts import helpers)
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "ACCORD_CHECK_COLLECTIVES": "1",  # every collective's caller and tensor devices checked (accord.collectives)
    "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path | None, *args: str, ranks: int = 2, module: str | None = None) -> list[str]:
    """The torchrun command running ``script`` (a worker), or ``module`` (``python -m``), on ``ranks`` local ranks."""
    target = [str(script)] if module is None else ["-m", module]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *target,
        *args,
    ]


def train_once(shards: Path, out: Path, *overrides: str, config: str = "tiny.yaml") -> list[str]:
    """The command of a one-process ``accord.train`` run on ``shards`` into ``out`` (no launcher)."""
    cmd = [sys.executable, "-m", "accord.train", "--config", str(ROOT / "configs" / config)]
    return [*cmd, f"data.train={shards}", f"output_dir={out}", *overrides]


def launch(
    shards: Path,
    out: Path,
    *overrides: str,
    resume: bool = False,
    config: str = "tiny.yaml",
    deepspeed: bool = False,
) -> list[str]:
    """The torchrun command (``deepspeed``: the deepspeed launcher's) of a 2-rank CPU ``accord.train`` run on
    ``shards`` into ``out``.

    torchrun by default: the deepspeed launcher is two more processes that each import DeepSpeed before a rank
    starts (~8 s of a ~40 s test run). It keeps its tests: the ones that read what a user of it sees, and
    ``launch/single_node.sh`` in test_launch and the two-node runs in test_multinode.
    """
    if deepspeed:
        start = [LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "accord.train"]
    else:
        start = torchrun(None, module="accord.train")
    cmd = [
        *start,
        "--config",
        str(ROOT / "configs" / config),
        f"data.train={shards}",
        f"output_dir={out}",
        *overrides,
    ]
    return [*cmd, "--resume", "latest"] if resume else cmd


def metrics(out: Path) -> list[dict]:
    """Every line a run logged to ``out/metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
