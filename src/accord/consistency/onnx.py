"""ONNX graphs of an exported backbone's towers (``accord export --onnx``): ``onnx/<modality>.onnx``, inputs named
as in :mod:`accord.models.towers`, output ``embedding``, a dynamic batch axis (and sequence axis for text).

With a generative head, per medium it decodes from: ``onnx/generative_<modality>.onnx`` (``input_ids``,
``attention_mask`` [B, T]; ``memory`` [B, L, W], the tower's token features, and ``memory_mask`` [B, L]) and
``onnx/generative_<modality>_null.onnx`` (the caption prior: ``input_ids``, ``attention_mask`` only), each giving
next-token ``logits`` [B, T, V]."""

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


class _HeadGraph(torch.nn.Module):
    """The generative head's logits given a medium's tokens (``null``: given its null medium)."""

    def __init__(self, head: torch.nn.Module, modality: str, null: bool):
        super().__init__()
        self.head, self.modality, self.null = head, modality, null

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
        if self.null:
            return self.head(ids, mask, None, None, self.modality)
        return self.head(ids, mask, memory[0], memory[1], self.modality)


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
    if model.generative is not None:
        paths.update(_save_generative(model, out, opset))
    return paths


def _save_generative(model: AccordModel, out: Path, opset: int) -> dict[str, Path]:
    head = model.generative
    assert head is not None
    paths = {}
    ids = torch.ones(2, 8, dtype=torch.long)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    text_axes = {n: {0: "batch", 1: "sequence"} for n in text}
    for modality in head.modalities:
        tokens = model.towers[modality](model.towers[modality].dummy_inputs(2, torch.device("cpu"), torch.float32))
        memory = {"memory": tokens.tokens, "memory_mask": tokens.mask}
        for null in (False, True):
            name = f"generative_{modality}{'_null' if null else ''}"
            inputs = text if null else {**text, **memory}
            axes = text_axes if null else {**text_axes, "memory": {0: "batch"}, "memory_mask": {0: "batch"}}
            paths[name] = out / f"{name}.onnx"
            torch.onnx.export(
                _HeadGraph(head, modality, null),
                tuple(inputs.values()),
                str(paths[name]),
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch", 1: "sequence"}},
                opset_version=opset,
                dynamo=False,
            )
    return paths
