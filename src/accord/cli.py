"""The ``accord`` command: one sub-command per stage of the pipeline."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "build-shards": ("accord.shards.build", "raw media + captions -> WebDataset shards"),
    "verify-shards": ("accord.shards.verify", "check shards, counts and decoding"),
    "train": ("accord.train.main", "train the towers (one process; use deepspeed/torchrun for more)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: accord COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\naccord: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
