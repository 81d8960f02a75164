"""Export trained towers from a DeepSpeed checkpoint (any ZeRO stage) into a self-contained backbone directory.

    accord export runs/tiny/checkpoints --out backbone/ [--tag step00000100] [--dtype bf16]
    accord export runs/clip/checkpoints --out clip/ --format hf-clip    # a transformers CLIPModel directory

The directory is written by :func:`accord.consistency.backbone.save_backbone` (its layout is described there) and
read by ``load_backbone``; this module turns a training run's checkpoint into one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from accord.config import from_dict
from accord.consistency.backbone import DTYPES, Backbone, load_backbone, save_backbone, set_generative_info
from accord.consistency.hf_clip import hf_clip_problems, save_hf_clip
from accord.consistency.onnx import save_onnx
from accord.errors import InputError, command
from accord.evaluation.compositional import choose_alpha, read_items
from accord.models import AccordModel
from accord.train.checkpoint import resolve
from accord.train.config import TrainConfig
from accord.verbosity import is_verbose

FORMATS = ("accord", "hf-clip")
ALPHA_SAMPLES = 500  # validation samples the generative score's alpha is chosen on


def read_client_state(checkpoint_dir: Path, tag: str | None) -> tuple[str, dict[str, Any]]:
    """The tag (default: ``latest``) and the client state of rank 0's model-states file: step, accord config.
    Only a committed tag (with its ``accord.json``) is read, and with ``weights_only=True``: tensors and plain
    data, no code."""
    tag = resolve(checkpoint_dir, tag)["tag"]
    model_states = sorted((checkpoint_dir / tag).glob("*model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"{checkpoint_dir / tag}: no DeepSpeed model states (is this a checkpoint folder?)")
    try:
        return tag, torch.load(model_states[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{model_states[0]}: holds objects other than tensors and plain data; accord does not load it "
            f"(weights_only=True): {str(e).splitlines()[0]}"
        ) from None


def consolidated_state_dict(checkpoint_dir: Path, tag: str, client: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 weights of any ZeRO stage (stage 0: the module state itself)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (
        list((checkpoint_dir / tag).glob("*optim_states.pt"))
        and client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) > 0
    ):
        with contextlib.nullcontext() if is_verbose() else contextlib.redirect_stdout(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)  # prints 4 lines
    return {k: v.float() for k, v in client["module"].items()}


def export(
    checkpoint_dir: str | Path,
    out: str | Path,
    tag: str | None = None,
    dtype: str = "fp32",
    onnx: bool = False,
    format: str = "accord",
    alpha_data: str | None = None,
    hub: dict[str, Any] | None = None,
) -> Path:
    """Export the checkpoint as an accord backbone directory, or (``format="hf-clip"``) a CLIPModel directory
    (see :mod:`accord.consistency.hf_clip`; refused before the weights are read when the towers have no such form).
    A generative head's alpha is chosen on ``alpha_data`` (default the run's ``data.val``); ``hub`` (``license``,
    ``datasets``, ``tags``) goes into the model card's Hub front matter."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if format not in FORMATS:
        raise ValueError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    tag, client = read_client_state(checkpoint_dir, tag)
    if "config" not in client:
        raise ValueError(f"{checkpoint_dir}: the checkpoint carries no accord config (not written by accord train)")
    cfg = from_dict(TrainConfig, client["config"])
    if format == "hf-clip" and (problems := hf_clip_problems(cfg.model, cfg.data)):
        raise ValueError(
            f"{checkpoint_dir}: --format hf-clip needs clip_text + clip_vision towers: " + "; ".join(problems)
        )
    state = consolidated_state_dict(checkpoint_dir, tag, client)
    model = AccordModel(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = (
        {k for k in missing if k.startswith("towers.video.backbone.")}
        if cfg.model.towers.get("video") and cfg.model.towers["video"].share_image_backbone
        else set()
    )
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if format == "hf-clip":
        skipped = save_hf_clip(model, cfg.data, out, DTYPES[dtype])
        if skipped:
            print(f"hf-clip: not exported (a CLIPModel has no place for them): {', '.join(skipped)}")
        return out
    save_backbone(
        model,
        cfg.data,
        out,
        dtype=dtype,
        source={"checkpoint": str(checkpoint_dir.resolve()), "tag": tag, "step": client.get("step")},
        card=model_card_lines(cfg, client.get("step")),
        hub=hub,
    )
    if model.generative is not None:
        choose_generative_alpha(out, alpha_data or cfg.data.val, model_card_lines(cfg, client.get("step")))
    if onnx:
        save_onnx(model, out / "onnx")
    return out


def choose_generative_alpha(out: Path, data: str | None, card: list[str]) -> None:
    """The generative score's alpha, chosen on validation shards (``--alpha-data``, else the run's ``data.val``;
    :func:`accord.evaluation.compositional.choose_alpha`) and stored in the backbone; 0 without any."""
    if data is None:
        print("generative head: no validation data (--alpha-data or the run's data.val): alpha 0, not chosen")
        return
    skipped: Counter[str] = Counter()
    items = read_items(data, skipped, ALPHA_SAMPLES)
    backbone = load_backbone(out)
    assert isinstance(backbone, Backbone)
    info = {**choose_alpha(backbone, items), "chosen_on": data}
    set_generative_info(out, info, card)
    search = ", ".join(f"{a:g}: {v:.3f}" for a, v in info["search"].items())
    print(f"generative head: alpha {info['alpha']:g} chosen on {info['samples']} samples of {data} ({search})")


def model_card_lines(cfg: TrainConfig, step: int | None) -> list[str]:
    """What the backbone's model card says about its training: data, steps, loss, and the last evaluation."""
    last_eval: dict[str, Any] = {}
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if any(k.startswith("eval/") for k in row):
                last_eval = row
    lines = [
        f"Trained by `accord train` on `{cfg.data.train}` for {step} steps "
        f"({cfg.loss.kind} loss, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision})."
    ]
    if last_eval:
        lines += [
            f"## Zero-shot retrieval at step {last_eval['step']} on `{cfg.data.val}`",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k[5:]} | {v:.4f} |" for k, v in last_eval.items() if k.startswith("eval/") and "/R@" in k]
    return lines


@command("accord export", also=(ValueError, RuntimeError))
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint_dir", help="the run's checkpoints/ folder (with 'latest' and stepNNNNNNNN/)")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--onnx", action="store_true", help="also write onnx/<modality>.onnx per tower (fp32)")
    p.add_argument(
        "--format",
        default="accord",
        choices=FORMATS,
        help="accord: the backbone directory (every tower); hf-clip: a transformers CLIPModel "
        "directory (clip_text + clip_vision towers)",
    )
    p.add_argument(
        "--alpha-data",
        default=None,
        help="generative head: validation shards to choose the score's alpha on (default: the run's data.val)",
    )
    p.add_argument("--license", default=None, help="the model card's licence for the Hub (default: other)")
    p.add_argument("--dataset", action="append", default=[], help="a dataset it was trained on (Hub id; repeatable)")
    p.add_argument("--hub-tag", action="append", default=[], help="an extra Hub tag (repeatable)")
    args = p.parse_args(argv)
    if args.onnx and args.format != "accord":
        raise ValueError("--onnx: only with --format accord")
    hub = {"license": args.license, "datasets": args.dataset, "tags": args.hub_tag}
    out = export(args.checkpoint_dir, args.out, args.tag, args.dtype, args.onnx, args.format, args.alpha_data, hub)
    print(f"exported {args.checkpoint_dir} -> {out}")
    return 0
