"""accord: distributed multimodal contrastive pretraining and cross-modal consistency scoring."""

from typing import Any

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)


def load_backbone(path: Any, device: Any = None, dtype: Any = None) -> Any:
    """Exported accord backbone (or HF CLIPModel directory) -> towers ready to embed raw inputs
    (:func:`accord.consistency.backbone.load_backbone`, imported when called: ``import accord`` stays light)."""
    from accord.consistency.backbone import load_backbone as load

    return load(path, device, dtype)
