"""The chain as four calls, for the demo, the experiments and scripts of your own:

    build_shards(raw, shards)                           raw media + captions -> WebDataset shards (accord.shards)
    launch_training(shards, val, run, config=...)       the deepspeed launcher over ``accord.train`` on CPU ranks
    export_backbone(run, backbone)                      the run's last checkpoint -> a backbone directory
    evaluate(backbone, val)                             zero-shot retrieval of the backbone on held-out shards

Each step prints one line per stage (the launcher's step lines are echoed) and raises on failure; the demo and the
experiments put world rendering before it and scoring after it. ``fresh_output_dir`` gives a command a folder it
may replace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from accord.errors import InputError
from accord.evaluation.evaluate import evaluate_backbone
from accord.resources import config_file
from accord.shards.build import BuildConfig, build
from accord.shards.media import AudioOptions, ImageOptions
from accord.train.export import export

MARKER = ".accord-output"  # a folder holding it was written by the command it names, and may be replaced
# What the pipeline's training runs share (2 CPU ranks, ZeRO-2); a caller's overrides come after and win.
CPU_RUN = (
    "data.batch_size=16",
    "deepspeed.zero_stage=2",
    "log.every=5",
    "log.console_every=50",  # a console line per 50 steps (the report plots every 5)
    "checkpoint.every=100000",
    "optim.warmup_steps=10",
    "optim.lr=3e-3",
)


def fresh_output_dir(out: Path, prog: str) -> Path:
    """An empty ``out``: a folder an earlier run of ``prog`` wrote (it holds the marker) is replaced; any other
    non-empty folder, or a file, is refused rather than deleted."""
    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: is a file, not a folder")
        marker = out / MARKER
        if any(out.iterdir()) and not (marker.exists() and marker.read_text().strip() == prog):
            raise InputError(
                f"--out {out}: a non-empty folder that {prog} did not write; give a new or empty "
                "folder (it would be replaced)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(prog + "\n")
    return out


def build_shards(raw: Path, out: Path, samples_per_shard: int, image_size: int = 64) -> dict[str, Any]:
    """Shards of a folder of stem-grouped media + captions (2 worker processes, images kept at ``image_size``,
    audio at 16 kHz up to 3 s); returns the build's stats."""
    cfg = BuildConfig(
        input=str(raw),
        output=str(out),
        samples_per_shard=samples_per_shard,
        workers=2,
        image=ImageOptions(resize_mode="keep_ratio", size=image_size, format="jpg", quality=92),
        audio=AudioOptions(sample_rate=16000, max_seconds=3.0),
        overwrite=True,
    )
    return build(cfg)


def launch_training(
    shards: Path,
    val: Path,
    run: Path,
    epochs: int,
    port: int,
    config: str = "tiny.yaml",
    overrides: tuple[str, ...] = (),
    ranks: int = 2,
) -> None:
    """Train with the deepspeed launcher on ``ranks`` CPU ranks (ZeRO-2, see ``CPU_RUN``); ``config`` is a path or
    the name of a shipped config. Step, eval and checkpoint lines are echoed; the whole log is ``run/train.log``."""
    cmd = [  # the deepspeed launcher of this interpreter's environment (a venv's bin/ may not hold its script)
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        "--module",
        "accord.train",
        "--config",
        str(config_file(config)),
        f"data.train={shards}",
        f"data.val={val}",
        f"output_dir={run}",
        f"epochs={epochs}",
        *CPU_RUN,
        *overrides,
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    log = []
    for line in proc.stdout:
        log.append(line)
        text = line.split("]: ", 1)[-1] if line.startswith("[rank") else line
        if text.startswith(("step ", "eval ", "resumed", "saved checkpoint")):
            print("  " + text.rstrip(), flush=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text("".join(log))
    if proc.wait() != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {run / 'train.log'}:\n" + "".join(log[-30:]))


def export_backbone(run: Path, out: Path, alpha_data: Path | None = None) -> Path:
    """The last checkpoint of the training run in ``run`` as a backbone directory ``out`` (``alpha_data``: the
    shards a generative head's alpha is chosen on, default the run's ``data.val``)."""
    return export(run / "checkpoints", out, alpha_data=str(alpha_data) if alpha_data else None)


def evaluate(backbone: Path, val: Path, plot: Path | None = None) -> dict[str, float]:
    """Zero-shot retrieval of ``backbone`` on the shards in ``val`` (and its similarity plot)."""
    return evaluate_backbone(str(backbone), str(val), plot=str(plot) if plot else None)
