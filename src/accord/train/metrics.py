"""Training logs: a console line, ``metrics.jsonl`` and (optionally) wandb and TensorBoard, written by rank 0;
the window of steps a log line summarises; the per-rank log of sample keys."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from accord.train.config import LogConfig


@dataclass
class MetricsWindow:
    """What this rank did since the last log line: samples trained (and of them, those with a counterfactual pair),
    seconds waiting for data, and the loss (total and per part) of each step."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    pairs: int = 0
    wait_s: float = 0.0
    loss: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, samples: int, wait_s: float, loss: float, parts: dict[str, float], pairs: int = 0) -> None:
        self.samples += samples
        self.pairs += pairs
        self.wait_s += wait_s
        self.loss.append(loss)
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


class StepProgress:
    """Rank 0's progress bar of optimiser steps (tqdm) with console lines written above it; without the bar, the
    lines are printed as they are."""

    def __init__(self, enabled: bool, rank: int):
        self.enabled = enabled and rank == 0
        self.bar: Any = None

    def start(self, step: int, total: int) -> None:
        if self.enabled and self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout, disable=False)

    def update(self, step: int, loss: float, samples_per_s: float | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        postfix = {"loss": f"{loss:.4f}"}
        if samples_per_s is not None:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricLogger:
    """Rank 0 writes; every rank may call. ``should_log`` is the policy: every ``log.every`` steps and the last."""

    def __init__(self, cfg: LogConfig, output_dir: Path, rank: int, run_config: dict[str, Any]):
        self.cfg, self.rank = cfg, rank
        self.path = output_dir / "metrics.jsonl"
        self.wandb: Any = None
        self.tensorboard: Any = None
        self.mlflow: MlflowRun | None = None
        self._purge_step: int | None = None
        self.progress = StepProgress(cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty()), rank)
        if rank == 0 and cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.run_name,
                config=run_config,
                dir=str(output_dir),
                mode="online" if cfg.wandb_online else "offline",
            )
        if rank == 0 and cfg.mlflow:
            uri = cfg.mlflow_uri or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
            self.mlflow = MlflowRun(uri, cfg.mlflow_experiment, cfg.run_name, output_dir, run_config)

    def should_log(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.every == 0 or step >= total_steps

    def should_print(self, step: int, total_steps: int) -> bool:
        """A logged step that also gets a console line (``log.console_every``)."""
        every = self.cfg.console_every or self.cfg.every
        return step % every == 0 or step >= total_steps

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the killed run logged after its last checkpoint."""
        if self.rank != 0 or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))
        self._purge_step = step + 1  # TensorBoard hides the killed run's events from this step on

    def _tensorboard(self):
        if self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._purge_step)
        return self.tensorboard

    def log(self, step: int, metrics: dict[str, Any], console: str | None = None) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.cfg.tensorboard:
            writer = self._tensorboard()
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, global_step=step)
            writer.flush()
        if self.mlflow is not None:
            self.mlflow.log(step, metrics)
        if console:
            self.progress.write(console)

    def close(self) -> None:
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close()


class MlflowRun:
    """One accord run as one MLflow run, through ``MlflowClient`` (no process-global active run). Its id is kept in
    ``output_dir/mlflow_run_id`` so that a resumed run logs on into the same MLflow run."""

    def __init__(self, uri: str, experiment: str, name: str | None, output_dir: Path, run_config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up lines
        self.client = MlflowClient(tracking_uri=uri)
        id_file = output_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in flatten(run_config).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=rows)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists and None as they are)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class SampleLog:
    """``samples/rank<R>.jsonl``: the sample keys of every optimiser step, one file per rank (its only writer). An
    audit trail of what each step trained on: which samples a run saw, and exactly-once checks across resumes."""

    def __init__(self, output_dir: Path, rank: int):
        self.folder, self.rank = output_dir / "samples", rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{rank:05d}.jsonl"

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Rank 0, on resume: drop every rank's lines past ``step`` (also of ranks a smaller world no longer has)."""
        if self.rank != 0:
            return
        for path in self.folder.glob("rank*.jsonl"):
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))
