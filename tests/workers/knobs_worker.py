"""Run as one process (a world of 1, started plainly) from test_perf_knobs.py: the trainer with the performance knobs
on synthetic batches. Writes ``<out>/knobs.json``:

- ``autocast/<stage>``: ZeRO 0-3 with ``deepspeed.precision=autocast_bf16``: losses, the dtype of an image-tower
  Linear's output (bf16 under autocast) and of its weight (fp32), the logged perf figures;
- ``eager`` / ``compiled`` / ``fused``: fp32 ZeRO-2, the towers compiled (``compile.backend`` from argv) or the
  fused AdamW: losses and the final parameters' checksum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from accord.config import load_config
from accord.resources import config_file
from accord.train.config import TrainConfig
from accord.train.distributed import init_distributed
from accord.train.main import Trainer


def run(out: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(
        TrainConfig,
        config_file("tiny"),
        [
            f"output_dir={out / name}",
            "data.synthetic=true",
            "max_steps=3",
            "log.every=1",
            "log.peak_tflops=2.0",
            "optim.warmup_steps=1",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    linear = next(m for m in trainer.engine.module.towers["image"].backbone.modules() if isinstance(m, torch.nn.Linear))
    dtypes: set[str] = set()
    hook = linear.register_forward_hook(lambda _m, _i, o: dtypes.add(str(o.dtype)))
    trainer.fit()
    hook.remove()
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    params = [p.detach().float() for p in trainer.engine.module.parameters()]
    return {
        "loss": [r["loss"] for r in rows],
        "output_dtypes": sorted(dtypes),
        "weight_dtype": str(linear.weight.dtype),
        "samples_per_s": [r["samples_per_s"] for r in rows],
        "model_tflops": [r["perf/model_tflops"] for r in rows],
        "mfu": [r["perf/mfu"] for r in rows],
        "flops_per_sample": trainer.flops_per_sample,
        "checksum": float(sum(p.sum() for p in params if p.numel())),
    }


def main(out: str, backend: str) -> None:
    init_distributed()
    path = Path(out)
    # The fp32 runs first: DeepSpeed's torch_autocast keeps process-wide state once an engine used it.
    results = {"eager": run(path, "eager")}
    results["compiled"] = run(path, "compiled", "compile={}", f"compile.backend={backend}")
    results["fused"] = run(path, "fused", "optim.fused=true")
    for stage in (0, 1, 2, 3):
        results[f"autocast/{stage}"] = run(
            path, f"autocast{stage}", "deepspeed.precision=autocast_bf16", f"deepspeed.zero_stage={stage}"
        )
    (path / "knobs.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
