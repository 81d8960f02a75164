"""Fixed sine-cosine position tables: 1D for token sequences (Transformer), 2D for patch grids (MAE / MoCo v3)."""

from __future__ import annotations

import torch


def sincos_1d(coords: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width] for positions ``coords`` [N]: sines then cosines of ``width / 2`` frequencies
    1 / 10000^(k / (width / 2)), computed in float64 on ``coords``' device and returned as float32."""
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=coords.device) / half)
    angle = coords.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """[grid * grid, width]: the 2D table of MAE / MoCo v3 for patches in row-major order; the first half of the
    channels is :func:`sincos_1d` of the row, the second of the column."""
    steps = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(steps, steps, indexing="ij")
    return torch.cat([sincos_1d(row.flatten(), width // 2), sincos_1d(col.flatten(), width // 2)], dim=1)
