"""ZeRO-3 with 2 real ranks (deepspeed launcher, gloo) where one rank's batch has no audio: no hang (the towers, and
the generative head with its caption loss)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.procs import ENV, WORKERS, free_port


@pytest.mark.slow
def test_zero3_rank_without_a_modality_does_not_hang(tmp_path: Path) -> None:
    """The towers and the generative head (its caption loss beside the contrastive one), in one run."""
    out = tmp_path / "losses.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKERS / "zero3_worker.py"),
        "--out",
        str(out),
        "--stage",
        "3",
        "--generative",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=420)  # a hang fails here
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = json.loads(out.read_text())
    assert len(losses) == 3
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert losses[0]["text-audio"] > 0  # rank 0's audio reached the (all-gathered) loss
    # rank 0's audio captions count (the global token mean); rank 1 ran the head without audio
    assert all(step["caption/text-audio"] > 0 for step in losses)
    assert losses[1].keys() >= {"caption/text-image", "caption_null/text-video"}
