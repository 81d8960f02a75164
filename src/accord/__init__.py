"""accord: distributed multimodal contrastive pretraining and cross-modal consistency scoring."""

__version__ = "0.1.0"


def load_backbone(path, device=None, dtype=None):
    """Exported accord backbone (or HF CLIPModel directory) -> towers ready to embed raw inputs."""
    from accord.consistency.backbone import load_backbone as _load

    return _load(path, device, dtype)
