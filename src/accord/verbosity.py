"""Quiet by default: accord's commands print their own lines (one per stage) and the libraries only their errors.

``--verbose`` on any command (or ``ACCORD_VERBOSE=1``) brings the libraries' output back: DeepSpeed's info and
warnings (the "Setting accelerator to CPU" notice), transformers' warnings and its "Loading weights" / "Writing
model shards" bars, other libraries' tqdm bars, torch's extension-build notes. The choice is passed on
through the environment, so data workers, launcher ranks and subprocesses follow it.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "ACCORD_VERBOSE"
FLAG = "--verbose"
# loggers whose warnings are noise to a user of accord (errors always pass)
_NOISY = ("DeepSpeed", "torch.utils.cpp_extension", "torch.distributed.elastic", "transformers")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _ErrorsOnly()


def take_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose`` (before a ``--``), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    verbose = FLAG in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == FLAG)], verbose


def is_verbose() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def configure(verbose: bool | None = None) -> bool:
    """Apply the verbosity (``None``: from ``ACCORD_VERBOSE``) to this process and, via the environment, to its
    children. Call it before importing DeepSpeed to silence the notice DeepSpeed logs at import time."""
    verbose = is_verbose() if verbose is None else verbose
    os.environ[ENV] = "1" if verbose else "0"
    if verbose:
        for name in _NOISY:
            logging.getLogger(name).removeFilter(_FILTER)
        return True
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this switch
    # other libraries' tqdm bars (DeepSpeed's "Loading checkpoint shards"); accord's bars pass disable= explicitly,
    # which wins over this default (read when tqdm is imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in _NOISY:  # a filter survives DeepSpeed's setLevel(INFO) when its logger is created at import
        logging.getLogger(name).addFilter(_FILTER)
    if "transformers" in sys.modules:  # imported already: its settings were read, set them directly
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    return False
