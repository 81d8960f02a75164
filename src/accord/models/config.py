"""Typed configs of the towers and of the multi-tower model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from accord.config import ConfigError
from accord.modalities import MODALITIES

TowerKind = Literal["bert", "clip_text", "vit", "clip_vision", "frames", "videomae", "ast", "whisper"]
KINDS_BY_MODALITY: dict[str, tuple[str, ...]] = {
    "text": ("bert", "clip_text"),
    "image": ("vit", "clip_vision"),
    "video": ("frames", "videomae"),
    "audio": ("ast", "whisper"),
}


@dataclass
class TowerConfig:
    """One encoder: a transformers backbone (random init from ``hf`` or loaded from ``pretrained``) + projection.

    ``frames`` (video only) runs an image backbone per frame (``frame_kind`` + ``hf``, or the image tower's
    backbone itself with ``share_image_backbone``) followed by temporal attention pooling over ``num_frames``.
    """

    kind: TowerKind
    """The backbone: text bert | clip_text, image vit | clip_vision, video frames | videomae, audio ast | whisper."""
    hf: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs of a randomly initialised backbone (e.g. ``hidden_size``)."""
    pretrained: str | None = None
    """A local HF model directory (or ``pkg:NAME/dir``) to load instead; never a hub name."""
    pooling: Literal["default", "cls", "mean"] = "default"
    """Tokens -> one vector: the kind's default (BERT mean, ViT cls, CLIP pooler, ...), the first token, or the mean."""
    freeze: bool = False
    """Keep the backbone's weights fixed (the projection still trains)."""
    unfreeze_last_n: int | None = None
    """With ``freeze``: train the last N transformer layers all the same."""
    frozen_dropout: bool = False
    """A fully frozen backbone runs in eval mode (no dropout); true keeps it in training mode."""
    frozen_cache: bool = True
    """A fully frozen backbone with nothing random in it computes each distinct input once and reuses its features
    (exactly: ``accord.models.frozen_cache``)."""
    frozen_cache_items: int = 1_000_000
    """Distinct inputs the frozen cache keeps (least recently used out); 0 recomputes every one."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in backward (HF gradient checkpointing): less memory, more compute."""
    lr_scale: float = 1.0
    """This tower's backbone learns at ``optim.lr`` x ``lr_scale`` (tune a pretrained tower gently)."""
    patch_dropout: float = 0.0
    """Image towers (vit, clip_vision): while training, drop this fraction of each image's patch tokens after the
    embeddings, CLS kept (FLIP; open_clip's ``patch_dropout``): fewer tokens per step; evaluation sees them all."""
    positions: Literal["learned", "sincos"] = "learned"
    """ViT backbones (kind vit, or frames of vit) from random init: ``sincos`` fixes the patch position embeddings to
    a 2D sine-cosine table (MAE, MoCo v3) instead of learning them from random values, so that attention can find
    where a patch is from the first step (``bench/image_placement.py``: a ViT places two objects in fewer epochs)."""
    frame_kind: Literal["vit", "clip_vision"] = "vit"
    """Kind ``frames``: the per-frame image backbone."""
    share_image_backbone: bool = False
    """Kind ``frames``: run the image tower's backbone on every frame instead of a backbone of its own."""
    num_frames: int = 8
    """Video: frames per clip (the temporal position embeddings)."""
    temporal_heads: int = 4
    """Kind ``frames``: attention heads of the temporal pooling."""

    def validate(self, prefix: str = "") -> None:
        modality = prefix.rsplit(".", 1)[-1]
        if modality not in MODALITIES:
            raise ConfigError(f"{prefix}: unknown modality (valid: {', '.join(MODALITIES)})")
        if self.kind not in KINDS_BY_MODALITY[modality]:
            raise ConfigError(
                f"{prefix}.kind: {self.kind!r} is not a {modality} tower "
                f"(valid: {', '.join(KINDS_BY_MODALITY[modality])})"
            )
        if self.pretrained and ("://" in self.pretrained and not self.pretrained.startswith("file://")):
            raise ConfigError(f"{prefix}.pretrained: must be a local directory, not {self.pretrained!r}")
        if self.unfreeze_last_n is not None and self.unfreeze_last_n < 0:
            raise ConfigError(f"{prefix}.unfreeze_last_n: must be >= 0")
        if self.lr_scale <= 0:
            raise ConfigError(f"{prefix}.lr_scale: must be > 0")
        if self.frozen_cache_items < 0:
            raise ConfigError(f"{prefix}.frozen_cache_items: must be >= 0")
        if not 0 <= self.patch_dropout < 1:
            raise ConfigError(f"{prefix}.patch_dropout: must be in [0, 1)")
        if self.patch_dropout > 0 and self.kind not in ("vit", "clip_vision"):
            raise ConfigError(f"{prefix}.patch_dropout: only for image towers of kind vit or clip_vision")
        if self.positions == "sincos":
            vit = (
                self.kind == "vit"
                or self.kind == "frames"
                and self.frame_kind == "vit"
                and not self.share_image_backbone
            )
            if not vit or self.pretrained:
                raise ConfigError(
                    f"{prefix}.positions: 'sincos' is for a ViT from random init (kind vit, or frames of vit "
                    "without share_image_backbone), not a pretrained one"
                )
            width = int(self.hf.get("hidden_size", 768))
            if width % 4:
                raise ConfigError(f"{prefix}.positions: 'sincos' needs hf.hidden_size divisible by 4, not {width}")
        if self.share_image_backbone and self.kind != "frames":
            raise ConfigError(f"{prefix}.share_image_backbone: only for kind 'frames'")


def check_attention_shape(dim: int, layers: int, heads: int, dropout: float, dot: str) -> None:
    """The checks every attention head's config shares (``dot``: its dotted prefix with the trailing dot)."""
    if dim < 1 or layers < 1 or heads < 1:
        raise ConfigError(f"{dot}dim/layers/heads: must be >= 1")
    if dim % heads:
        raise ConfigError(f"{dot}heads: dim {dim} is not divisible by {heads} heads")
    if not 0 <= dropout < 1:
        raise ConfigError(f"{dot}dropout: must be in [0, 1)")


@dataclass
class FusionConfig:
    """Cross-attention fusion head (image-text matching as in ALBEF/BLIP) over the towers' token features.

    Text tokens are the queries and attend to the other modality's tokens (``symmetric``: the other modality's
    tokens also attend to the text); one module serves every text pair, told apart by a modality embedding.
    """

    dim: int = 256
    """Width of the cross-attention layers (tower tokens are projected to it)."""
    layers: int = 2
    """Cross-attention layers."""
    heads: int = 4
    """Attention heads (must divide ``dim``)."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of ``dim``."""
    symmetric: bool = False
    """The other modality's tokens also attend to the text (two streams)."""
    text_positions: bool = False
    """Add a fixed 1D sine-cosine table of each text token's index to the projected text tokens. Without it the
    head's own layers see the caption as a set and rely on whatever order the tower's features still carry; the
    relation of "A left of B" depends on which object is named first."""
    dropout: float = 0.0
    """Dropout in attention and MLP."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        check_attention_shape(self.dim, self.layers, self.heads, self.dropout, dot)
        if self.text_positions and self.dim % 2:
            raise ConfigError(f"{dot}text_positions: needs an even dim, not {self.dim}")


@dataclass
class GenerativeConfig:
    """A caption decoder trained with the towers (CoCa): causal self-attention over the caption's tokens (the text
    tower's tokenizer ids, its vocabulary) and cross-attention to a medium tower's token features; one module for
    every medium trained against text, told apart by a modality embedding. Its caption likelihood is the
    ``generative`` consistency score."""

    dim: int = 256
    """Width of the decoder (tower tokens are projected to it)."""
    layers: int = 2
    """Decoder layers (each: causal self-attention, cross-attention to the medium, MLPs)."""
    heads: int = 4
    """Attention heads (must divide ``dim``)."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of ``dim``."""
    dropout: float = 0.0
    """Dropout in attention and MLP."""
    max_length: int = 77
    """Caption positions (tokens, with the tokenizer's start and end ones); ``data.text.max_length`` must fit."""
    null_weight: float = 0.25
    """Weight of the same captions decoded from a learned null medium (one token per modality): it trains the
    caption prior P(caption) that the generative score divides out (VisualGPTScore); 0 trains none (CoCa)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        check_attention_shape(self.dim, self.layers, self.heads, self.dropout, dot)
        if self.max_length < 2:
            raise ConfigError(f"{dot}max_length: must be >= 2 (a start token and one more)")
        if self.null_weight < 0:
            raise ConfigError(f"{dot}null_weight: must be >= 0")


@dataclass
class ModelConfig:
    """Towers per modality, the shared embedding size, which pairs are trained, and the temperatures."""

    towers: dict[str, TowerConfig] = field(metadata={"key": "modality"})
    """One tower per modality (text, image, video, audio); at least two."""
    embed_dim: int = 512
    """Size of the shared embedding space."""
    pairs: Literal["text_anchored", "image_anchored", "all"] = "text_anchored"
    """Trained pairs: text with every other tower, image with every other, or every pair."""
    temperature: Literal["per_pair", "shared"] = "per_pair"
    """One learned temperature per pair, or one for all."""
    init_temperature: float = 0.07
    """Initial softmax temperature (CLIP's 0.07)."""
    learn_temperature: bool = True
    """False keeps the temperature at ``init_temperature`` (fixed-temperature ablations)."""
    max_logit_scale: float = 100.0
    """Clamp of 1 / temperature in the forward (CLIP's 100)."""
    init_logit_bias: float | None = None
    """Initial logit bias of the sigmoid loss (e.g. -10); needed by ``loss.kind: siglip``."""
    fusion: FusionConfig | None = None
    """Optional cross-attention match head over the text pairs' tokens (a fused score beside the cosine)."""
    generative: GenerativeConfig | None = None
    """Optional caption decoder over the media of the text pairs, trained jointly (CoCa; ``loss.caption_weight``)."""

    def validate(self, prefix: str = "") -> None:
        dot = f"{prefix}." if prefix else ""
        if not self.towers:
            raise ConfigError(f"{dot}towers: at least two towers are needed")
        if len(self.towers) < 2:
            raise ConfigError(f"{dot}towers: at least two towers are needed, got {list(self.towers)}")
        anchor = {"text_anchored": "text", "image_anchored": "image"}.get(self.pairs)
        if anchor and anchor not in self.towers:
            raise ConfigError(f"{dot}pairs: {self.pairs!r} needs a {anchor} tower")
        video = self.towers.get("video")
        if video and video.share_image_backbone and "image" not in self.towers:
            raise ConfigError(f"{dot}towers.video.share_image_backbone: needs an image tower")
        if self.embed_dim < 1:
            raise ConfigError(f"{dot}embed_dim: must be >= 1")
        if not 0 < self.init_temperature < 1:
            raise ConfigError(f"{dot}init_temperature: must be in (0, 1)")
        if self.fusion is not None and not self.fusion_pairs():
            raise ConfigError(
                f"{dot}fusion: needs a trained pair with text (pairs: "
                f"{', '.join(pair_name(*p) for p in self.pair_list()) or 'none'})"
            )

        if self.generative is not None and not self.generative_pairs():
            raise ConfigError(
                f"{dot}generative: needs a trained pair with text (pairs: "
                f"{', '.join(pair_name(*p) for p in self.pair_list()) or 'none'})"
            )

    def pair_list(self) -> list[tuple[str, str]]:
        """Trained pairs, each ordered by MODALITIES (so 'text-image', never 'image-text')."""
        present = [m for m in MODALITIES if m in self.towers]
        if self.pairs == "all":
            return [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]
        anchor = "text" if self.pairs == "text_anchored" else "image"
        return [
            (anchor, m) if MODALITIES.index(anchor) < MODALITIES.index(m) else (m, anchor)
            for m in present
            if m != anchor
        ]

    def fusion_pairs(self) -> list[tuple[str, str]]:
        """Trained pairs the fusion head scores: those with text (text tokens are its queries)."""
        return [p for p in self.pair_list() if p[0] == "text"] if self.fusion is not None else []

    def generative_pairs(self) -> list[tuple[str, str]]:
        """Trained pairs the generative head captions: those with text (it decodes the text from the medium)."""
        return [p for p in self.pair_list() if p[0] == "text"] if self.generative is not None else []


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"
