"""``accord.train`` with one fault injected, for test_multinode.py: rank 1 SIGKILLs itself while DeepSpeed writes
its optimiser partition of checkpoint tag $ACCORD_DIE_IN_TAG (half of the checkpoint's files are on disk then)."""

from __future__ import annotations

import os
import signal
import sys

import torch

from accord.train.main import main

real_save = torch.save


def save_or_die(obj, f, *args, **kwargs):
    path = str(f)
    if os.environ["RANK"] == "1" and os.environ["ACCORD_DIE_IN_TAG"] in path and "optim_states" in path:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = save_or_die
    sys.exit(main(sys.argv[1:]))
