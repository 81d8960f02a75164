"""The backbone directory: written by :func:`save_backbone` (``accord export``), read by :func:`load_backbone` for
scoring, which also reads a plain HF CLIPModel directory.

    backbone.json             format, embed_dim, pairs, model config, preprocessing per modality, source
    towers/<modality>/        a transformers ``save_pretrained`` directory per tower
    heads.safetensors         projections, temporal pooling, temperatures (and logit biases), the fusion head
    tokenizer/                the text tokenizer (when there is a text tower)
    README.md                 model card: towers, how to load, data, steps, last evaluation
    onnx/<modality>.onnx      with ``accord export --onnx``: each tower (:mod:`accord.consistency.onnx`)

``Backbone.embed(modality, inputs)`` takes raw inputs and returns L2-normalised embeddings [B, D]:

- text: a list of strings, or ``{"inputs_embeds": [B, L, H], "attention_mask": [B, L]}`` (soft tokens; BERT towers)
- image: paths, bytes, PIL images, uint8 [B, 3, H, W] / [3, H, W] tensors, or float tensors in [0, 1]
- video: paths or bytes, or float frames [B, T, 3, H, W] in [0, 1]
- audio: paths or bytes, or float waveforms [B, samples] at the backbone's sample rate

``Backbone.encode`` also returns token features, and ``match_logits`` runs the fusion head on them (when the
backbone was trained with one); ``caption_log_likelihood`` runs the generative head (``model.generative``):
the mean per-token log-probability of captions given encoded media, or given its null medium. The generative
score's debiasing weight alpha lives in ``backbone.json`` (``generative.alpha``, chosen on validation data at export).

Float tensors go through differentiable torch ops only (resize, crop, normalise, fbank), so gradients reach the
pixels, frames and waveforms.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from accord.config import from_dict, to_dict
from accord.data.config import AudioConfig, DataConfig, ImageConfig, VideoConfig
from accord.data.decode import decode_audio, decode_image, decode_video
from accord.data.transforms import audio_features, normalize, resize_center_crop, video_to_tensor
from accord.errors import InputError
from accord.modalities import MEDIA
from accord.models import AccordModel, ModelConfig
from accord.models.towers import TowerOutput, cat_tokens
from accord.resources import resolve_local_dir

FORMAT = "accord-backbone"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _read(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    return Path(item).read_bytes()


def image_batch(images: Any, cfg: ImageConfig, device: torch.device | None = None) -> torch.Tensor:
    """Raw images -> normalised [B, 3, S, S] (resize shorter side, centre crop, as the eval transform).

    uint8 tensors are resized as uint8 (as torchvision-backed HF image processors do, so CLIP directories give
    their own preprocessing's numbers), same-size images in one batched call; float tensors in [0, 1] take a
    differentiable float path. Tensors move to ``device`` first, so an accelerator does the resizing and the
    host sends uint8."""
    if (
        isinstance(images, (list, tuple))
        and images
        and all(torch.is_tensor(i) for i in images)
        and len({(i.dtype, tuple(i.shape)) for i in images}) == 1
    ):
        images = torch.stack(list(images))
    if torch.is_tensor(images) and images.dim() == 3:
        images = images[None]
    if torch.is_tensor(images) and images.dim() == 4:
        images = images.to(device) if device is not None else images
        x = resize_center_crop(images, cfg.size)
        return normalize(x.float() / 255.0 if x.dtype == torch.uint8 else x, cfg.mean, cfg.std)
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            item = torch.from_numpy(np.array(item.convert("RGB"))).permute(2, 0, 1)
        elif not torch.is_tensor(item):
            item = decode_image(_read(item), min_size=cfg.size)
        out.append(image_batch(item, cfg, device))
    return torch.cat(out)


class Backbone(nn.Module):
    """Towers + preprocessing of an exported accord backbone."""

    def __init__(
        self,
        model: AccordModel,
        preprocess: dict[str, Any],
        tokenizer: Any | None,
        path: Path,
        generative: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.generative_info = generative or {}  # backbone.json's "generative": alpha and how it was chosen
        image: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.get("image", {}).items()
        }
        self.image_cfg = ImageConfig(**image)
        self.video_cfg = VideoConfig(**preprocess.get("video", {}))
        self.audio_cfg = AudioConfig(**preprocess.get("audio", {}))
        self.max_length = preprocess.get("text", {}).get("max_length", 77)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.model.towers)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, modality: str, inputs: Any) -> dict[str, torch.Tensor]:
        """Raw inputs -> the tower's input tensors (see the module docstring)."""
        if modality == "text":
            if isinstance(inputs, dict):
                return inputs
            if self.tokenizer is None:
                raise ValueError(f"{self.path}: this backbone has no tokenizer/ (give text as inputs_embeds)")
            enc = self.tokenizer(
                list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if modality == "image":
            return {"pixel_values": image_batch(inputs, self.image_cfg, self.device)}
        if modality == "video":
            if torch.is_tensor(inputs):  # [B, T, 3, H, W] in [0, 1]
                frames = [
                    video_to_tensor(
                        (v.permute(0, 2, 3, 1) * 255.0),
                        self.video_cfg,
                        self.image_cfg.mean,
                        self.image_cfg.std,
                        False,
                        random.Random(0),
                    )
                    for v in inputs
                ]
            else:
                frames = [
                    video_to_tensor(
                        decode_video(_read(v), self.video_cfg.num_frames, self.video_cfg.backend),
                        self.video_cfg,
                        self.image_cfg.mean,
                        self.image_cfg.std,
                        False,
                        random.Random(0),
                    )
                    for v in inputs
                ]
            return {"pixel_values": torch.stack(frames)}
        rate = self.audio_cfg.sample_rate
        if torch.is_tensor(inputs):
            waves = [w[None] if w.dim() == 1 else w for w in (inputs if inputs.dim() > 1 else inputs[None])]
        else:
            waves = [decode_audio(_read(a), rate)[0] for a in inputs]
        feats = [audio_features(w, rate, self.audio_cfg, False, random.Random(0)) for w in waves]
        return {"features": torch.stack(feats)}

    def _tower_inputs(self, modality: str, inputs: Any) -> dict[str, torch.Tensor]:
        if modality not in self.model.towers:
            raise ValueError(f"this backbone has no {modality} tower (it has {', '.join(self.modalities)})")
        dtype = next(self.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in self.prepare(modality, inputs).items()
        }

    def encode(self, modality: str, inputs: Any) -> TowerOutput:
        """Embeddings [B, D] and token features (for the fusion head) of raw inputs."""
        return self.model.towers[modality](self._tower_inputs(modality, inputs))

    def embed(self, modality: str, inputs: Any) -> torch.Tensor:
        return self.encode(modality, inputs).embedding.float()  # scores in fp32 whatever the towers' dtype

    def pooled(self, modality: str, inputs: Any) -> torch.Tensor:
        """A tower's backbone features [B, W] before the projection (fp32): what the projection has to work with."""
        return self.model.towers[modality].pooled(self._tower_inputs(modality, inputs)).float()

    def encode_all(self, modality: str, inputs: list[Any], chunk: int = 64) -> TowerOutput:
        """``encode`` in chunks; tokens padded to the longest chunk (mask False on the padding)."""
        outs = [self.encode(modality, inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)]
        return TowerOutput(torch.cat([o.embedding for o in outs]), *cat_tokens([(o.tokens, o.mask) for o in outs]))

    @property
    def has_fusion(self) -> bool:
        return self.model.fusion is not None

    def match_logits(self, text: TowerOutput, other: TowerOutput, modality: str) -> torch.Tensor:
        """Fusion-head match logits [B] of encoded text and encoded ``modality`` rows."""
        if self.model.fusion is None:
            raise ValueError(f"{self.path}: this backbone has no fusion head (train with model.fusion set)")
        return self.model.fusion(text.tokens, text.mask, other.tokens, other.mask, modality)

    @property
    def has_generative(self) -> bool:
        return self.model.generative is not None

    @property
    def generative_alpha(self) -> float:
        """The weight of the caption prior the generative score subtracts (0 where export chose none)."""
        return float(self.generative_info.get("alpha", 0.0))

    def caption_log_likelihood(self, captions: Any, medium: TowerOutput | None, modality: str) -> torch.Tensor:
        """Mean per-token log-probability [B] (fp32) of each caption (strings, or ``input_ids`` +
        ``attention_mask``) given the encoded ``medium`` rows (:meth:`encode`; one row serves every caption), or,
        with ``medium=None``, given the head's null ``modality`` medium: the caption prior."""
        head = self.model.generative
        if head is None:
            raise ValueError(f"{self.path}: this backbone has no generative head (train with model.generative set)")
        text = captions if isinstance(captions, dict) else self._tower_inputs("text", captions)
        if "input_ids" not in text:
            raise ValueError("the generative score reads captions as token ids, not inputs_embeds")
        ids, mask = text["input_ids"].to(self.device), text["attention_mask"].to(self.device).to(torch.bool)
        memory = memory_mask = None
        if medium is not None:
            memory, memory_mask = medium.tokens, medium.mask
            if memory.shape[0] == 1 and ids.shape[0] > 1:  # N captions against one medium: one pass
                memory, memory_mask = memory.expand(ids.shape[0], -1, -1), memory_mask.expand(ids.shape[0], -1)
            if memory.shape[0] != ids.shape[0]:
                raise ValueError(f"batch sizes differ: {ids.shape[0]} captions, {memory.shape[0]} {modality} rows")
        logp = head.token_log_probs(ids, mask, memory, memory_mask, modality)
        return (logp.sum(dim=1) / mask[:, 1:].sum(dim=1).clamp(min=1)).float()


class HFClipBackbone(nn.Module):
    """A plain transformers CLIPModel directory (text + image), with its own tokenizer and image processor."""

    modalities = ("text", "image")
    has_fusion = False
    has_generative = False

    def __init__(self, path: Path):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.path = path
        self.clip = CLIPModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = CLIPImageProcessor.from_pretrained(path)
        crop = self.processor.crop_size
        size = crop if isinstance(crop, int) else (getattr(crop, "height", None) or crop["height"])
        mean, std = self.processor.image_mean, self.processor.image_std
        self.image_cfg = ImageConfig(size=size, mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]))
        self.max_length = self.clip.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, modality: str, inputs: Any) -> torch.Tensor:
        def features(out: Any) -> torch.Tensor:
            return out if torch.is_tensor(out) else out.pooler_output

        if modality == "text":
            enc = self.tokenizer(
                list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            emb = features(
                self.clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            )
        elif modality == "image":
            tensors = torch.is_tensor(inputs) or (
                isinstance(inputs, (list, tuple)) and inputs and all(torch.is_tensor(i) for i in inputs)
            )
            if tensors and (self.device.type != "cpu" or _is_float(inputs)):
                # float: the differentiable path; uint8 on an accelerator: resized there (same numbers as the
                # processor to 1e-5, tested). On CPU the processor's PIL resize is faster
                # (44 vs 69 ms per 64 images: bench/score.py --breakdown).
                pixels = image_batch(inputs, self.image_cfg, self.device)
            else:
                items = [Image.open(io.BytesIO(_read(i))) if isinstance(i, (str, Path, bytes)) else i for i in inputs]
                pixels = self.processor(images=items, return_tensors="pt")["pixel_values"]
            emb = features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype)))
        else:
            raise ValueError(f"a CLIP backbone has no {modality} tower (it has text, image)")
        return F.normalize(emb.float(), dim=-1)


def embed_in_chunks(backbone: Backbone | HFClipBackbone, modality: str, inputs: Any, chunk: int = 64) -> torch.Tensor:
    """``backbone.embed(modality, ...)`` over ``inputs`` (a sequence) ``chunk`` at a time: [N, D], fp32."""
    return torch.cat([backbone.embed(modality, inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])


def _is_float(inputs: Any) -> bool:
    first = inputs if torch.is_tensor(inputs) else inputs[0]
    return first.is_floating_point()


def load_backbone(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Backbone | HFClipBackbone:
    """An exported accord backbone directory, or a HF CLIPModel directory (``config.json`` of model_type clip).

    ``dtype`` (e.g. ``torch.bfloat16`` on a GPU) casts the towers; embeddings and scores stay fp32."""
    path = Path(path)
    if (path / "backbone.json").exists():
        meta = json.loads((path / "backbone.json").read_text())
        model_cfg = meta["model"]
        for tower in model_cfg["towers"].values():
            tower["pretrained"] = str(path / tower["pretrained"])
        try:
            model = AccordModel(from_dict(ModelConfig, model_cfg, "model"))
        except (OSError, ValueError) as e:
            raise InputError(
                f"{path}: a tower does not load as backbone.json describes it: {str(e).splitlines()[0]}"
            ) from None
        heads = load_file(str(path / "heads.safetensors"))
        state = {}
        for key, value in heads.items():
            head, _, rest = key.partition(".")
            state[key if head in ("logit_scale", "logit_bias", "fusion", "generative") else f"towers.{head}.{rest}"] = (
                value
            )
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatches: towers/ and heads.safetensors from different models
            lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            raise InputError(
                f"{path}: heads.safetensors does not match the towers (a tower's config was changed, "
                f"or files of two backbones were mixed): {lines[0] if lines else e}"
            ) from None
        bad = [k for k in missing if ".backbone." not in k]
        if bad or unexpected:
            raise InputError(f"{path}: heads do not match the towers (missing {bad[:5]}, unexpected {unexpected[:5]})")
        tokenizer = None
        if (path / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        backbone: Backbone | HFClipBackbone = Backbone(
            model, meta["preprocess"], tokenizer, path, generative=meta.get("generative")
        )
    elif (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get("model_type") == "clip":
        backbone = HFClipBackbone(path)
    else:
        raise FileNotFoundError(f"{path}: neither an accord backbone (backbone.json) nor a HF CLIPModel directory")
    return backbone.to(device=device, dtype=dtype)


def save_backbone(
    model: AccordModel,
    data: DataConfig,
    out: Path,
    dtype: str = "fp32",
    source: dict[str, Any] | None = None,
    card: list[str] | None = None,
    generative: dict[str, Any] | None = None,
    hub: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (with the preprocessing of ``data``) as a backbone directory that :func:`load_backbone`
    reads: towers, heads, tokenizer, ``backbone.json`` and a model card (``card``: lines about its training;
    ``generative``: the generative score's alpha and how it was chosen; ``hub``: ``license``, ``datasets`` and
    ``tags`` for the card's Hub front matter). Weights are safetensors; an image tower's preprocessing is also
    written as ``preprocessor_config.json`` (a CLIPImageProcessor), so the folder is ready for
    ``huggingface_hub.upload_folder``."""
    torch_dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    heads: dict[str, torch.Tensor] = {}
    towers_cfg = {}
    for modality, tower in model.towers.items():
        tcfg = model.cfg.towers[modality]
        if not tcfg.share_image_backbone:
            tower.backbone.to(torch_dtype).save_pretrained(out / "towers" / modality)
            tower.backbone.float()
        for name, t in tower.state_dict().items():
            if not name.startswith("backbone."):
                heads[f"{modality}.{name}"] = t.detach().to(torch_dtype).contiguous()
        pretrained = f"towers/{'image' if tcfg.share_image_backbone else modality}"
        towers_cfg[modality] = {
            **to_dict(tcfg),
            "pretrained": pretrained,
            "freeze": False,
            "unfreeze_last_n": None,
            "gradient_checkpointing": False,
            "positions": "learned",  # the saved weights hold a sincos table; loading must not refuse or rebuild it
        }
    for kind in ("fusion", "generative"):
        module = getattr(model, kind)
        if module is not None:
            for name, t in module.state_dict().items():
                heads[f"{kind}.{name}"] = t.detach().to(torch_dtype).contiguous()
    for kind in ("logit_scale", "logit_bias"):
        params = getattr(model, kind)
        if params is not None:
            for name, p in params.items():
                heads[f"{kind}.{name}"] = p.detach().float().contiguous()
    save_file(heads, str(out / "heads.safetensors"))
    if "text" in model.towers and data.text.tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(resolve_local_dir(data.text.tokenizer)).save_pretrained(out / "tokenizer")
    model_cfg = {**to_dict(model.cfg), "towers": towers_cfg}
    preprocess = {m: to_dict(getattr(data, m)) for m in MEDIA if m in model.towers}
    if "text" in model.towers:
        preprocess["text"] = {"tokenizer": "tokenizer", "max_length": data.text.max_length}
    meta = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype,
        "embed_dim": model.cfg.embed_dim,
        "modalities": list(model.towers),
        "pairs": [list(p) for p in model.pairs],
        "model": model_cfg,
        "preprocess": preprocess,
        "source": source or {},
        "hub": hub or {},
    }
    if model.generative is not None:
        meta["generative"] = generative or {"alpha": 0.0, "chosen_on": None}
    (out / "backbone.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "README.md").write_text(model_card(meta, card or []))
    if "image" in model.towers:
        (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(data), indent=1))


def image_processor_config(data: DataConfig) -> dict[str, Any]:
    """The image preprocessing of evaluation (resize the short side, centre crop, normalise) as a transformers
    CLIPImageProcessor config."""
    size = data.image.size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data.image.mean),
        "image_std": list(data.image.std),
        "do_convert_rgb": True,
    }


def hub_front_matter(meta: dict[str, Any]) -> str:
    """The model card's YAML front matter as the Hugging Face Hub reads it (library, licence, tags, task, datasets)."""
    hub = meta.get("hub") or {}
    modalities = list(meta["modalities"])
    front: dict[str, Any] = {
        "library_name": "accord",
        "license": hub.get("license") or "other",
        "tags": ["accord", "contrastive", "cross-modal-consistency", *modalities, *hub.get("tags", [])],
        "pipeline_tag": "zero-shot-image-classification"
        if {"text", "image"} <= set(modalities)
        else "feature-extraction",
    }
    if hub.get("datasets"):
        front["datasets"] = list(hub["datasets"])
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n"


def set_generative_info(out: Path, info: dict[str, Any], card: list[str] | None = None) -> None:
    """Store the generative score's alpha and how it was chosen in a written backbone (``backbone.json``, card)."""
    meta = json.loads((out / "backbone.json").read_text())
    meta["generative"] = info
    (out / "backbone.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "README.md").write_text(model_card(meta, card or []))


def model_card(meta: dict[str, Any], training: list[str]) -> str:
    """The backbone directory's README: its towers, how to load it, and the given lines about its training."""
    towers = ", ".join(f"{m} ({meta['model']['towers'][m]['kind']})" for m in meta["modalities"])
    pairs = ", ".join("-".join(p) for p in meta["pairs"])
    lines = [
        hub_front_matter(meta),
        "# accord backbone",
        "",
        f"Towers: {towers}; embedding size {meta['embed_dim']}; pairs {pairs}.",
        "",
    ]
    if training:
        lines += [training[0], ""]
    lines += ["Load with `accord.load_backbone(DIR)` or `ConsistencyScorer.from_pretrained(DIR)`.", ""]
    fusion = meta["model"].get("fusion")
    if fusion:
        lines += [
            f"Fusion head: {fusion['layers']} cross-attention layers of width {fusion['dim']}"
            f"{' (symmetric)' if fusion['symmetric'] else ''}, trained with mined hard negatives; "
            '`scorer.score(..., mode="fused")` gives the match probability of text pairs.',
            "",
        ]
    generative = meta["model"].get("generative")
    if generative:
        alpha = meta.get("generative", {})
        chosen = alpha.get("chosen_on")
        lines += [
            f"Generative head: a {generative['layers']}-layer caption decoder of width {generative['dim']} over the "
            f'media\'s token features, trained with the towers (CoCa); `scorer.score(..., mode="generative")` gives '
            f"the mean token log-likelihood of a caption given the medium minus alpha = {alpha.get('alpha', 0.0):g} x "
            f"its likelihood from the null medium ({'alpha chosen on ' + chosen if chosen else 'alpha not chosen'}).",
            "",
        ]
    return "\n".join(lines + training[1:]) + "\n"
