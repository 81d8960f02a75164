"""ONNX graphs of an exported backbone's towers (``accord export --onnx``): ``onnx/<modality>.onnx``, inputs named
as in :mod:`accord.models.towers`, output ``embedding``, a dynamic batch axis (and sequence axis for text)."""

from __future__ import annotations

from pathlib import Path

import torch

from accord.models import AccordModel


class _TowerWithNamedInputs(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module, names: list[str]):
        super().__init__()
        self.tower, self.names = tower, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.names, inputs, strict=True))).embedding


def save_onnx(model: AccordModel, out: Path, opset: int = 17) -> dict[str, Path]:
    """One ONNX graph per tower with a dynamic batch axis (and sequence axis for text); needs ``onnx``."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RuntimeError("--onnx needs the onnx package: pip install onnx") from None
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    model = model.float().eval()
    for modality, tower in model.towers.items():
        inputs = tower.dummy_inputs(2, torch.device("cpu"), torch.float32)
        if modality == "text":
            ids = torch.ones(2, 8, dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        names = list(inputs)
        axes = {n: ({0: "batch", 1: "sequence"} if modality == "text" else {0: "batch"}) for n in names}
        paths[modality] = out / f"{modality}.onnx"
        torch.onnx.export(
            _TowerWithNamedInputs(tower, names),
            tuple(inputs.values()),
            str(paths[modality]),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return paths
