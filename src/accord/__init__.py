"""accord: distributed multimodal contrastive pretraining and cross-modal consistency scoring."""

__version__ = "0.1.0"
