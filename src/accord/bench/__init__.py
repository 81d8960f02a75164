"""``accord bench NAME``: experiments that train, decode and score, and write a table (markdown + JSON) and a plot.

    accord bench fusion [--quick]       cosine vs fused consistency score on one-attribute-wrong captions
    accord bench captioning --backbone DIR --data SHARDS --val SHARDS
                                        caption decoding / training strategies with and without consistency
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {"fusion": "accord.bench.fusion", "captioning": "accord.bench.captioning"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"accord bench: unknown benchmark {argv[0]!r} (valid: {', '.join(BENCHES)})", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
