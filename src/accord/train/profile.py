"""Where a training step's time goes: torch.profiler over a window of steps (``log.profile_start``,
``log.profile_steps``).

The trainer marks its stages with ``torch.profiler.record_function`` labels (a no-op when no profiler runs):

    accord/data_wait            waiting for the loader's next batch
    accord/forward/<modality>   one tower's forward
    accord/loss                 the contrastive (+ matching) loss, all-gathers included
    accord/backward             backward (ZeRO's gradient reduction runs inside it)
    accord/optimizer_step       DeepSpeed's step (ZeRO-1/2: the parameter all-gather)
    accord/log                  the logging collectives of a log step

Each rank writes ``<output_dir>/profile/rank<R>.trace.json`` (open it in Perfetto or chrome://tracing) and
``rank<R>.stages.json``: milliseconds per step of every stage, and of each kind of collective
(``communication/gloo:all_reduce``, ... wherever it ran). Stages nest (communication runs inside backward and the
loss), so they do not add up to the step time, which is reported beside them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

COMM_PREFIXES = ("gloo:", "nccl:")  # one event per collective, lasting until it completes


def stage(name: str) -> record_function:
    """``with stage("loss"): ...`` marks the block as ``accord/loss`` in a profile."""
    return record_function(f"accord/{name}")


def stage_table(events: Any, steps: int, wall_s: float) -> dict[str, float]:
    """ms per step of each ``accord/*`` label and of all communication ops, from ``prof.key_averages()``."""
    table: dict[str, float] = {}
    for e in events:
        if e.key.startswith("accord/"):
            table[e.key[len("accord/") :]] = round(e.cpu_time_total / 1000 / steps, 3)
        elif e.key.startswith(COMM_PREFIXES):  # e.g. "communication/gloo:all_reduce"
            table[f"communication/{e.key}"] = round(e.cpu_time_total / 1000 / steps, 3)
    table["step (wall)"] = round(wall_s * 1000 / steps, 3)
    return dict(sorted(table.items()))


class StepProfiler:
    """Profiles optimiser steps ``start .. start + steps - 1`` (1-based, as logged) on every rank."""

    def __init__(self, start: int | None, steps: int, output_dir: Path, rank: int):
        self.start, self.steps, self.rank = start, steps, rank
        self.folder = output_dir / "profile"
        self._prof: profile | None = None
        self._t0 = 0.0

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if self.start is None or step != self.start or self._prof is not None:
            return  # (a step number asked twice: the end of an epoch, before its next step runs)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities)
        self._prof.start()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> dict[str, float] | None:
        """Call with the number of the step that just ran; returns the stage table when the window closes."""
        if self._prof is None or self.start is None or step != self.start + self.steps - 1:
            return None
        return self.close(step)

    def close(self, step: int) -> dict[str, float] | None:
        """End the window at ``step`` (the run ended inside it: the table covers the steps that ran)."""
        if self._prof is None or self.start is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.stop()
        steps = max(1, step - self.start + 1)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.folder / f"rank{self.rank:05d}.trace.json"))
        table = stage_table(self._prof.key_averages(), steps, wall)
        (self.folder / f"rank{self.rank:05d}.stages.json").write_text(
            json.dumps({"steps": [self.start, step], "ms_per_step": table}, indent=1)
        )
        self._prof = None
        return table
