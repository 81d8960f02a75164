"""The ``accord`` command: one sub-command per stage of the pipeline."""

from __future__ import annotations

import importlib
import sys

from accord import verbosity
from accord.shutdown import end_process

COMMANDS = {
    "demo": ("accord.demo.run", "the whole chain on embedded data (--quick: 3 minutes)"),
    "build-shards": ("accord.shards.build", "raw media + captions -> WebDataset shards"),
    "verify-shards": ("accord.shards.verify", "check shards, counts and decoding"),
    "train": ("accord.train.main", "train the towers (one process; use deepspeed/torchrun for more)"),
    "report": ("accord.train.report", "a training run's output_dir -> one HTML page of its curves and tables"),
    "export": ("accord.train.export", "DeepSpeed checkpoint (any ZeRO stage) -> backbone directory"),
    "score": ("accord.consistency.score", "consistency scores of a manifest or shard set"),
    "eval": (
        "accord.evaluation.evaluate",
        "zero-shot retrieval R@1/5/10 + similarity plot; --classes: zero-shot classification",
    ),
    "experiment": ("accord.experiments", "experiments with a table and a plot: fusion, captioning, recipes"),
}


def run() -> None:
    """The ``accord`` console script: ``main`` on ``sys.argv``, then the process ends."""
    end_process(main())


def main(argv: list[str] | None = None) -> int:
    argv, verbose = verbosity.take_flag(list(sys.argv[1:] if argv is None else argv))
    verbosity.configure(verbose or None)  # before the command's imports (DeepSpeed logs at import time)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print(
            "usage: accord COMMAND [options] [--verbose]\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\nOutput is one line per stage; --verbose (or ACCORD_VERBOSE=1) adds the libraries' logs and "
            "progress bars."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\naccord: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module_name), function or "main")(argv[1:])


if __name__ == "__main__":
    run()
