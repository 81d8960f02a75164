"""Run as one plain process from test_train.py: ``accord.train.main`` once per bad override (argv: shards, output
folder, then the overrides), each as the command would run it; writes ``<out>/results.json`` = [[exit status,
stderr], ...] in order. One process for all of them: each would otherwise spend its seconds importing torch."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch.distributed

from accord.resources import config_file
from accord.train.main import main


def run(shards: str, out: Path, override: str) -> list:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", str(config_file("tiny")), f"data.train={shards}", f"output_dir={out}", override])
    return [code, err.getvalue()]


if __name__ == "__main__":
    # one process group for all the runs: DeepSpeed keeps its groups across destroy / init within one process
    torch.distributed.destroy_process_group = lambda *a, **k: None
    shards, out, *overrides = sys.argv[1:]
    results = [run(shards, Path(out) / str(i), o) for i, o in enumerate(overrides)]
    (Path(out) / "results.json").write_text(json.dumps(results))
