"""Model FLOPs per training sample, counted once with torch's FLOP counter, and MFU against the device's peak.

A training step costs about 3x a forward for what trains (forward, and backward through activations and weights),
1x for a frozen backbone (forward only: no gradient flows into it) and nothing for a frozen backbone whose features
come from the frozen-feature cache. The counter runs one forward of the model and its losses (the heads run inside
them) on a few synthetic samples; each tower's backbone is weighted by its state, everything else (projections,
heads, losses) by 3. MFU is the achieved model FLOP/s per device over the device's dense peak at the run's precision
(the PaLM definition: recomputation from gradient checkpointing does not count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

Use = Literal["trained", "frozen", "cached"]
MULTIPLIER: dict[Use, int] = {"trained": 3, "frozen": 1, "cached": 0}

# Dense peak TFLOP/s per GPU (vendor datasheets, SXM parts; no sparsity), by the name torch reports and the math
# that the run's precision uses. The first name contained in the device's name wins (H100 PCIe before H100).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
}


def math_precision(precision: str, tf32: bool) -> str:
    """The datasheet column a run's matmuls use: bf16 / fp16 / autocast_bf16 -> bf16, fp32 -> tf32 or fp32."""
    if precision in ("bf16", "fp16", "autocast_bf16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for a device name (``torch.cuda.get_device_name()``), None for an unknown device."""
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_name:
            return peaks[precision]
    return None


def count(run: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one call of ``run`` per module (dotted names from the outermost module, e.g.
    ``AccordModel.towers.text.backbone``) and ``"Global"`` for the total."""
    with FlopCounterMode(display=False) as counter:
        run()
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def training_flops(per_module: dict[str, int], backbones: dict[str, Use], root: str = "AccordModel") -> int:
    """Training FLOPs of a counted forward: each ``root.towers.<m>.backbone`` times its use's multiplier, the rest
    times 3."""
    total = per_module.get("Global", 0)
    backbone_flops = {m: per_module.get(f"{root}.towers.{m}.backbone", 0) for m in backbones}
    rest = total - sum(backbone_flops.values())
    return 3 * rest + sum(MULTIPLIER[use] * backbone_flops[m] for m, use in backbones.items())


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated on ``device`` since start (None on CPU, where the logs give peak RSS instead)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
