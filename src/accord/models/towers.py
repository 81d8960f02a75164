"""Tower encoders: a transformers backbone, pooling, a projection to the shared space, L2 normalisation.

Inputs per modality (what the data pipeline's collate produces):

- text:  ``input_ids`` [B, L] and ``attention_mask`` [B, L]
- image: ``pixel_values`` [B, 3, H, W]
- video: ``pixel_values`` [B, T, 3, H, W]
- audio: ``features`` [B, T, n_mels] (fbank / log-mel, time-major)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from accord.models.config import TowerConfig
from accord.models.frozen_cache import FrozenFeatureCache, active_dropout
from accord.models.positions import sincos_positions
from accord.resources import resolve_local_dir

# kind -> (config class, model class, constructor kwargs)
_BACKBONES: dict[str, tuple[str, str, dict]] = {
    "bert": ("BertConfig", "BertModel", {"add_pooling_layer": False}),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", {}),
    "vit": ("ViTConfig", "ViTModel", {"add_pooling_layer": False}),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", {}),
    "videomae": ("VideoMAEConfig", "VideoMAEModel", {}),
    "ast": ("ASTConfig", "ASTModel", {}),
    "whisper": ("WhisperConfig", "WhisperModel", {}),
}
_DEFAULT_POOLING = {
    "bert": "mean",
    "clip_text": "pooler",
    "vit": "cls",
    "clip_vision": "pooler",
    "videomae": "mean",
    "ast": "pooler",
    "whisper": "mean",
}


def build_backbone(kind: str, hf: dict, pretrained: str | None) -> transformers.PreTrainedModel:
    """Random init from ``hf`` config kwargs (``_from_config``, so ``zero.Init`` applies) or a local directory."""
    config_name, model_name, init_kwargs = _BACKBONES[kind]
    model_cls = getattr(transformers, model_name)
    if pretrained:
        folder = resolve_local_dir(pretrained)
        model, info = model_cls.from_pretrained(folder, output_loading_info=True, **init_kwargs)
        # transformers fills what the files lack with random values and only warns: a tower whose config.json no
        # longer matches its weights (or a checkpoint of another architecture) would silently be noise
        missing = sorted(info.get("missing_keys", [])) + sorted(str(k) for k in info.get("mismatched_keys", []))
        if missing:
            raise ValueError(
                f"{folder}: {len(missing)} weights of the {model_name} that config.json describes are "
                f"missing from the files or have another shape (e.g. {missing[0]}); they would be random"
            )
        return model.get_encoder() if kind == "whisper" else model
    config = getattr(transformers, config_name)(**hf)
    if kind == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder._from_config(config)
    return model_cls._from_config(config, **init_kwargs)


def fix_sincos_positions(vit: Any) -> None:
    """Replace a ViT's learned position embeddings by a fixed :func:`sincos_positions` table (the CLS token's: 0)."""
    embeddings = vit.embeddings
    n, width = embeddings.position_embeddings.shape[1:]
    grid = int(round((n - 1) ** 0.5))
    assert grid * grid == n - 1, f"a ViT of {n - 1} patches is not a square grid"
    table = torch.cat([torch.zeros(1, width), sincos_positions(grid, width)])[None]
    embeddings.position_embeddings = nn.Parameter(table, requires_grad=False)


def backbone_width(backbone: Any) -> int:
    """The hidden size of a transformers backbone."""
    cfg = backbone.config
    return getattr(cfg, "hidden_size", None) or cfg.d_model


class TemporalPool(nn.Module):
    """Attention pooling over per-frame features: a learned query attends to frames (+ temporal positions)."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, max_frames, dim))
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, frames: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features [B, T, D] -> pooled [B, D]; every frame's patches [B, T, P, D] -> tokens
        [B, T * P, D] tagged with their frame's temporal position (all parameters used inside this forward, as
        ZeRO-3 gathers a module's parameters for its own forward only)."""
        t = frames.shape[1]
        if t > self.pos.shape[1]:
            raise ValueError(
                f"video has {t} frames, the tower was built for at most {self.pos.shape[1]} (towers.video.num_frames)"
            )
        x = self.norm(frames + self.pos[:, :t])
        pooled, _ = self.attn(self.query.expand(frames.shape[0], -1, -1), x, x, need_weights=False)
        return pooled[:, 0] + frames.mean(dim=1), (patches + self.pos[:, :t, None, :]).flatten(1, 2)


def _required(mask: torch.Tensor | None) -> torch.Tensor:
    assert mask is not None, "text is computed with its attention mask"
    return mask


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class TowerOutput(NamedTuple):
    embedding: torch.Tensor  # [B, embed_dim], L2-normalised
    tokens: torch.Tensor  # [B, L, width]: the backbone's last hidden states (video: all frames' patches)
    mask: torch.Tensor  # bool [B, L]: real tokens


def cat_tokens(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (tokens [b, L_i, W], mask [b, L_i]) chunks along the batch, padding to the longest L_i (mask
    False on the padding): text chunks are padded to their own longest caption."""
    length = max(t.shape[1] for t, _ in parts)
    return (
        torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t, _ in parts]),
        torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in parts]),
    )


class Tower(nn.Module):
    """One modality's encoder; ``forward(inputs)`` returns the L2-normalised embeddings [B, embed_dim] and the
    token features (:class:`TowerOutput`)."""

    def __init__(self, modality: str, cfg: TowerConfig, embed_dim: int, shared_backbone: nn.Module | None = None):
        super().__init__()
        self.modality, self.cfg = modality, cfg
        self.backbone_kind = cfg.frame_kind if cfg.kind == "frames" else cfg.kind
        backbone = (
            build_backbone(self.backbone_kind, cfg.hf, cfg.pretrained) if shared_backbone is None else shared_backbone
        )
        self.backbone = cast(Any, backbone)  # a transformers model: its config and methods are dynamic
        width = backbone_width(self.backbone)
        self.temporal: TemporalPool | None = None
        if cfg.kind == "frames":
            self.temporal = TemporalPool(width, cfg.temporal_heads, cfg.num_frames)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        if cfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.freeze and shared_backbone is None:
            freeze_backbone(self.backbone, cfg.unfreeze_last_n or 0)
        if cfg.positions == "sincos":
            fix_sincos_positions(self.backbone)
        if cfg.patch_dropout > 0:
            embeddings = getattr(self.backbone, "vision_model", self.backbone).embeddings
            embeddings.register_forward_hook(patch_dropout_hook(cfg.patch_dropout))
        self.cache: FrozenFeatureCache | None = None  # see enable_cache
        self.cache_tokens = False  # the cache keeps a medium's token features beside its pooled ones

    def _run(self, mask: torch.Tensor | None, **kwargs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, W] and the last hidden states [B, L, W]."""
        out = self.backbone(**kwargs)
        pooling = self.cfg.pooling if self.cfg.pooling != "default" else _DEFAULT_POOLING[self.backbone_kind]
        hidden = out.last_hidden_state
        if pooling == "pooler":
            return out.pooler_output, hidden
        if pooling == "cls":
            return hidden[:, 0], hidden
        return _masked_mean(hidden, mask), hidden

    def _backbone_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The backbone's keyword inputs for a batch, and the text attention mask (None for media)."""
        kind = self.cfg.kind
        if kind in ("bert", "clip_text"):
            # soft tokens (a generator's expected embeddings) instead of ids: differentiable in the tokens
            text = (
                {"inputs_embeds": inputs["inputs_embeds"]}
                if "inputs_embeds" in inputs
                else {"input_ids": inputs["input_ids"]}
            )
            return text, inputs["attention_mask"]
        if kind in ("vit", "clip_vision", "videomae"):
            return {"pixel_values": inputs["pixel_values"]}, None
        if kind == "frames":
            return {"pixel_values": inputs["pixel_values"].flatten(0, 1)}, None
        if kind == "ast":
            return {"input_values": inputs["features"]}, None
        return {"input_features": inputs["features"].transpose(1, 2)}, None  # whisper: [B, n_mels, T]

    # ------------------------------------------------------------------------------------ cut-layer text towers
    @property
    def cut(self) -> int | None:
        """A BERT text tower frozen but for its last ``unfreeze_last_n`` layers: the index of its first trainable
        layer (the frozen bottom's token states can be cached per caption); None otherwise."""
        n = self.cfg.unfreeze_last_n or 0
        if self.cfg.kind != "bert" or not self.cfg.freeze or n <= 0:
            return None
        return max(0, self.backbone.config.num_hidden_layers - n)

    def _layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
        attn = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            hidden = layer(hidden, attn)
        return hidden

    @torch.no_grad()
    def cut_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, L, W] at the cut: the frozen embeddings and bottom layers (eval mode, no gradient)."""
        assert self.cut is not None
        hidden = self.backbone.embeddings(input_ids=input_ids)
        return self._layers(hidden, mask, list(self.backbone.encoder.layer)[: self.cut])

    def _cut_features(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and last hidden states of a cut-layer tower: cached (or computed) bottom, trained top."""
        assert self.cut is not None
        if self.cache is not None:
            states = self.cache({"input_ids": input_ids}, mask)
        else:
            states = self.cut_states(input_ids, mask)
        hidden = self._layers(states, mask, list(self.backbone.encoder.layer)[self.cut :])
        pooling = self.cfg.pooling if self.cfg.pooling != "default" else _DEFAULT_POOLING[self.backbone_kind]
        return (hidden[:, 0] if pooling == "cls" else _masked_mean(hidden, mask)), hidden

    def _features(
        self, inputs: dict[str, torch.Tensor], kwargs: dict[str, torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, W] before the projection and the token features [B, L, W] (video: every frame's)."""
        if self.cut is not None and "input_ids" in kwargs and mask is not None:
            return self._cut_features(kwargs["input_ids"], mask)
        text_mask = {"attention_mask": mask} if mask is not None else {}
        pooled, tokens = self._run(mask, **kwargs, **text_mask)
        if self.temporal is not None:
            b, t = inputs["pixel_values"].shape[:2]
            pooled, tokens = self.temporal(pooled.view(b, t, -1), tokens.view(b, t, tokens.shape[1], -1))
        return pooled, tokens

    def pooled(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's pooled features [B, W] before the projection (what a probe of the backbone reads)."""
        kwargs, mask = self._backbone_inputs(inputs)
        return self._features(inputs, kwargs, mask)[0]

    def forward(self, inputs: dict[str, torch.Tensor]) -> TowerOutput:
        kwargs, mask = self._backbone_inputs(inputs)
        if self.cache is not None and self.cut is None and "inputs_embeds" not in kwargs:
            # pooled features, and a medium's token features when a head reads them (row 0 pooled, then tokens)
            cached = self.cache(kwargs, mask)
            if self.cache_tokens:
                pooled, tokens = cached[:, 0], cached[:, 1:]
            else:
                pooled, tokens = cached, cached.new_zeros(cached.shape[0], 0, cached.shape[1])
            return TowerOutput(
                F.normalize(self.proj(pooled), dim=-1),
                tokens,
                torch.ones(tokens.shape[:2], dtype=torch.bool, device=pooled.device),
            )
        pooled, tokens = self._features(inputs, kwargs, mask)
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TowerOutput(F.normalize(self.proj(pooled), dim=-1), tokens, mask.to(torch.bool))

    # ------------------------------------------------------------------------------------ frozen towers
    @property
    def fully_frozen(self) -> bool:
        """Nothing in the backbone trains (also one shared with a frozen image tower)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> Tower:
        """A fully frozen backbone (a cut-layer tower: its frozen bottom) stays in eval mode (no dropout), unless
        ``frozen_dropout`` keeps it training."""
        super().train(mode)
        if self.cfg.frozen_dropout:
            return self
        if self.fully_frozen:
            self.backbone.eval()
        elif self.cut is not None:
            self.backbone.embeddings.eval()
            for layer in list(self.backbone.encoder.layer)[: self.cut]:
                layer.eval()
        return self

    def cache_refusal(self) -> str | None:
        """Why this tower's backbone features cannot be cached (None: they can)."""
        if not self.cfg.freeze:
            return "not frozen"
        if not self.fully_frozen and self.cut is None:
            return f"unfreeze_last_n = {self.cfg.unfreeze_last_n} leaves layers trainable (a cut-layer cache: bert)"
        if self.cfg.kind == "frames":
            return "the frames tower's temporal pooling needs every frame's patch features"
        if self.cfg.patch_dropout > 0:
            return f"patch_dropout = {self.cfg.patch_dropout} drops random patches"
        if self.cfg.frozen_dropout:
            source = active_dropout(self.backbone)
            if source is not None:
                return f"frozen_dropout keeps dropout active ({source})"
        if not self.cfg.frozen_cache:
            return "frozen_cache is off"
        return None

    def enable_cache(self, tokens: bool = False) -> str | None:
        """Cache the backbone's features when :meth:`cache_refusal` allows; returns the refusal otherwise.
        ``tokens``: a head reads this tower's token features, so they are cached too (media only: a caption's token
        states change with what else is in its batch, a medium's come in one fixed shape)."""
        refusal = self.cache_refusal()
        if refusal is None and tokens and self.cfg.kind in ("bert", "clip_text") and self.cut is None:
            refusal = "the fusion head reads its token features"
        positions = getattr(self.backbone.config, "max_position_embeddings", None)
        if refusal is None and self.cut is not None:  # the bottom's token states per caption
            self.cache = FrozenFeatureCache(
                lambda kw, mask: self.cut_states(kw["input_ids"], _required(mask)),
                self.cfg.frozen_cache_items,
                text=True,
                per_token=True,
                max_positions=positions,
            )
        elif refusal is None:
            self.cache_tokens = tokens and self.cut is None

            def run(kw: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
                pooled, hidden = self._run(mask, **kw, **({"attention_mask": mask} if mask is not None else {}))
                return torch.cat([pooled[:, None], hidden], dim=1) if self.cache_tokens else pooled

            self.cache = FrozenFeatureCache(
                run,
                self.cfg.frozen_cache_items,
                text=self.cfg.kind in ("bert", "clip_text"),
                max_positions=positions if self.cfg.kind in ("bert", "clip_text") else None,
            )
        return refusal

    def dummy_inputs(self, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A minimal valid input, run when a rank's batch lacks this modality (ZeRO-3 needs every tower run)."""
        c = self.backbone.config
        kind = self.cfg.kind
        if kind in ("bert", "clip_text"):
            ids = torch.zeros(n, 2, dtype=torch.long, device=device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind in ("vit", "clip_vision"):
            return {
                "pixel_values": torch.zeros(n, c.num_channels, c.image_size, c.image_size, device=device, dtype=dtype)
            }
        if kind in ("frames", "videomae"):
            t = self.cfg.num_frames if kind == "frames" else c.num_frames
            return {
                "pixel_values": torch.zeros(
                    n, t, c.num_channels, c.image_size, c.image_size, device=device, dtype=dtype
                )
            }
        if kind == "ast":
            return {"features": torch.zeros(n, c.max_length, c.num_mel_bins, device=device, dtype=dtype)}
        return {"features": torch.zeros(n, 2 * c.max_source_positions, c.num_mel_bins, device=device, dtype=dtype)}


def layer_list(backbone: nn.Module) -> nn.ModuleList | None:
    """The transformer block list: the longest ModuleList named like '*layer*' / '*layers*'."""
    candidates = [
        m
        for name, m in backbone.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    return max(candidates, key=len, default=None)


def layer_depths(backbone: nn.Module) -> tuple[dict[int, int], int]:
    """Each parameter's depth (by ``id``) and the number of blocks L: 0 before the first transformer block (the
    embeddings), i + 1 in block i, L + 1 after the last (final norms, pooler), in registration order; ({}, 0) where
    no block list is found."""
    layers = layer_list(backbone)
    if layers is None:
        return {}, 0
    block_of = {id(q): i + 1 for i, block in enumerate(layers) for q in block.parameters()}
    depths: dict[int, int] = {}
    after_a_block = False
    for q in backbone.parameters():
        after_a_block = after_a_block or id(q) in block_of
        depths[id(q)] = block_of.get(id(q), len(layers) + 1 if after_a_block else 0)
    return depths, len(layers)


def patch_dropout_hook(rate: float) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
    """A forward hook for a ViT's embeddings module: while training, keep the CLS token and a random
    ``1 - rate`` of the patch tokens of each image (FLIP; open_clip's ``patch_dropout``); nothing in eval mode."""

    def hook(module: nn.Module, _inputs: Any, tokens: torch.Tensor) -> torch.Tensor | None:
        if not module.training or rate <= 0:
            return None
        b, n, width = tokens.shape
        keep = max(1, int((n - 1) * (1 - rate)))
        order = torch.rand(b, n - 1, device=tokens.device).argsort(dim=1)[:, :keep]
        patches = tokens[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([tokens[:, :1], patches], dim=1)

    return hook


def freeze_backbone(backbone: nn.Module, unfreeze_last_n: int = 0) -> None:
    """Freeze everything; with ``unfreeze_last_n`` keep the last N blocks and the norms after them trainable."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    if unfreeze_last_n <= 0:
        return
    layers = layer_list(backbone)
    if layers is None:
        raise ValueError(f"{type(backbone).__name__}: no transformer layer list found for unfreeze_last_n")
    for block in list(layers)[-unfreeze_last_n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    last_layer_params = {id(p) for p in layers[-1].parameters()}
    after = False
    for _, p in backbone.named_parameters():  # registration order: embeddings, blocks, final norms
        if after:
            p.requires_grad_(True)
        after = after or id(p) in last_layer_params


class TowerDict(nn.ModuleDict):
    """The towers by modality: a ModuleDict whose entries are typed as :class:`Tower`."""

    def __getitem__(self, key: str) -> Tower:
        return cast(Tower, super().__getitem__(key))

    def items(self) -> Iterator[tuple[str, Tower]]:  # type: ignore[override]
        return ((k, cast(Tower, v)) for k, v in super().items())

    def values(self) -> Iterator[Tower]:  # type: ignore[override]
        return (cast(Tower, v) for v in super().values())
