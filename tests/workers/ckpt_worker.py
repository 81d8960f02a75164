"""Run under a launcher from test_multinode.py: resume a Trainer from a checkpoint tag (on whatever world size and
ZeRO stage it is given) and save every parameter's full fp32 value and Adam moments, read through DeepSpeed's public
API, so that loads on different world sizes can be compared."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from accord.config import load_config
from accord.train.config import TrainConfig
from accord.train.distributed import init_distributed
from accord.train.main import Trainer


def main(config: str, tag: str, dump: str, *overrides: str) -> None:
    cfg = load_config(TrainConfig, config, list(overrides))
    init_distributed()
    trainer = Trainer(cfg, resume=tag)
    optimizer = trainer.engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link moments to params at step 1
        optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in trainer.engine.module.named_parameters():
        state[name] = [
            safe_get_full_fp32_param(p).clone(),
            safe_get_full_optimizer_state(p, "exp_avg").clone(),
            safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        ]
    if dist.get_rank() == 0:
        torch.save({"step": trainer.step, "state": state}, dump)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])  # the deepspeed launcher adds it
