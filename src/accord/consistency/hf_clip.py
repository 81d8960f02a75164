"""Write an accord model's text and image towers as a standard transformers ``CLIPModel`` directory.

    accord export runs/clip/checkpoints --out clip_dir/ --format hf-clip

Possible when the text tower is ``clip_text`` and the image tower ``clip_vision``, both with their default
(``pooler``) pooling: then an accord embedding is exactly ``normalize(projection(pooler_output))``, which is what
``CLIPModel.get_text_features`` / ``get_image_features`` compute. The directory holds the model (projections from
the towers' ``proj``, ``logit_scale`` = the text-image pair's learned, clamped temperature), the tokenizer and a
``CLIPImageProcessor`` that resizes the shorter side (bicubic), centre-crops and normalises as accord's scorer does,
and a ``CLIPProcessor`` tying them together, so ``CLIPModel.from_pretrained(dir)``, ``AutoProcessor``,
torchmetrics' CLIPScore (callable route) and HF pipelines load it without accord.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from accord.data.config import DataConfig
from accord.models import AccordModel, ModelConfig
from accord.resources import resolve_local_dir


def hf_clip_problems(model_cfg: ModelConfig, data: DataConfig) -> list[str]:
    """Why this model has no CLIPModel form (empty when it has one)."""
    towers = model_cfg.towers
    problems = []
    for modality, kind in (("text", "clip_text"), ("image", "clip_vision")):
        tower = towers.get(modality)
        if tower is None:
            problems.append(f"there is no {modality} tower")
        elif tower.kind != kind:
            problems.append(f"the {modality} tower is {tower.kind!r}, not {kind!r}")
        elif tower.pooling != "default":
            problems.append(f"the {modality} tower pools with {tower.pooling!r}; CLIP uses the pooler output")
    if "text" in towers and not data.text.tokenizer:
        problems.append("data.text.tokenizer is not set")
    return problems


def left_out(model_cfg: ModelConfig) -> list[str]:
    """Parts of the model a CLIPModel cannot hold (they are not exported in this format)."""
    parts = [f"{m} tower" for m in model_cfg.towers if m not in ("text", "image")]
    return parts + (["fusion head"] if model_cfg.fusion is not None else [])


def to_hf_clip(model: AccordModel, data: DataConfig) -> tuple[Any, Any, Any]:
    """The (CLIPModel, tokenizer, CLIPImageProcessor) equivalent of ``model``'s text and image towers."""
    import transformers as tr

    problems = hf_clip_problems(model.cfg, data)
    if problems:
        raise ValueError("--format hf-clip needs clip_text + clip_vision towers: " + "; ".join(problems))
    text, image = model.towers["text"], model.towers["image"]
    scale = model.temperatures()["text-image"].detach().float().log().item()
    config = tr.CLIPConfig(
        text_config=text.backbone.config.to_dict(),
        vision_config=image.backbone.config.to_dict(),
        projection_dim=model.cfg.embed_dim,
        logit_scale_init_value=scale,
    )
    clip = tr.CLIPModel(config)
    state = {f"text_model.{k}": v for k, v in text.backbone.state_dict().items()}
    state |= {f"vision_model.{k}": v for k, v in image.backbone.state_dict().items()}
    state |= {
        "text_projection.weight": text.proj.weight,
        "visual_projection.weight": image.proj.weight,
        "logit_scale": torch.tensor(scale),
    }
    clip.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=True)
    assert data.text.tokenizer is not None  # hf_clip_problems refuses a text tower without one
    tokenizer = tr.AutoTokenizer.from_pretrained(resolve_local_dir(data.text.tokenizer))
    tokenizer.model_max_length = min(data.text.max_length, text.backbone.config.max_position_embeddings)
    size = data.image.size
    processor = tr.CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        image_mean=list(data.image.mean),  # 3: bicubic
        image_std=list(data.image.std),
        do_convert_rgb=True,
    )
    return clip.eval(), tokenizer, processor


def save_hf_clip(model: AccordModel, data: DataConfig, out: Path, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write the CLIPModel directory of ``model`` trained on ``data``'s preprocessing; returns what was left out
    (other towers, fusion head)."""
    import transformers as tr

    clip, tokenizer, image_processor = to_hf_clip(model, data)
    out.mkdir(parents=True, exist_ok=True)
    clip.to(dtype).save_pretrained(out)
    tr.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, for tools that load it alone
    return left_out(model.cfg)
