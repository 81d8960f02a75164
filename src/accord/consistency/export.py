"""Export trained towers from a DeepSpeed checkpoint (any ZeRO stage) into a self-contained backbone directory.

    accord export runs/tiny/checkpoints --out backbone/ [--tag step00000100] [--dtype bf16]
    accord export runs/clip/checkpoints --out clip/ --format hf-clip    # a transformers CLIPModel directory

Layout of the (default) accord backbone directory::

    backbone.json             format, embed_dim, pairs, model config, preprocessing per modality, source
    towers/<modality>/        a transformers ``save_pretrained`` directory per tower
    heads.safetensors         projections, temporal pooling, temperatures (and logit biases), the fusion head
    tokenizer/                the text tokenizer (when there is a text tower)
    README.md                 model card: data, steps, last evaluation
    onnx/<modality>.onnx      with --onnx: each tower (inputs as in accord.models.towers, output "embedding")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from accord.config import from_dict, to_dict
from accord.consistency.backbone import DTYPES
from accord.consistency.hf_clip import hf_clip_problems, save_hf_clip
from accord.errors import command
from accord.models import AccordModel
from accord.train.config import TrainConfig

FORMAT = "accord-backbone"
FORMATS = ("accord", "hf-clip")


def read_client_state(checkpoint_dir: Path, tag: str | None) -> tuple[str, dict[str, Any]]:
    """The tag (default: ``latest``) and the client state of rank 0's model-states file: step, accord config."""
    tag = tag or (checkpoint_dir / "latest").read_text().strip()
    model_states = sorted((checkpoint_dir / tag).glob("*model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"{checkpoint_dir / tag}: no DeepSpeed model states (is this a checkpoint folder?)")
    return tag, torch.load(model_states[0], map_location="cpu", weights_only=False)


def consolidated_state_dict(checkpoint_dir: Path, tag: str, client: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 weights of any ZeRO stage (stage 0: the module state itself)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (
        list((checkpoint_dir / tag).glob("*optim_states.pt"))
        and client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) > 0
    ):
        import contextlib
        import io

        from accord.verbosity import is_verbose

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
) -> Path:
    """Export the checkpoint as an accord backbone directory, or (``format="hf-clip"``) a CLIPModel directory
    (see :mod:`accord.consistency.hf_clip`; refused before the weights are read when the towers have no such form)."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if format not in FORMATS:
        raise ValueError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    tag, client = read_client_state(checkpoint_dir, tag)
    if "config" not in client:
        raise ValueError(f"{checkpoint_dir}: the checkpoint carries no accord config (not written by accord train)")
    cfg = from_dict(TrainConfig, client["config"])
    if format == "hf-clip" and (problems := hf_clip_problems(cfg)):
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
        skipped = save_hf_clip(model, cfg, out, DTYPES[dtype])
        if skipped:
            print(f"hf-clip: not exported (a CLIPModel has no place for them): {', '.join(skipped)}")
        return out
    save_backbone(
        model,
        cfg,
        out,
        dtype=dtype,
        source={"checkpoint": str(checkpoint_dir.resolve()), "tag": tag, "step": client.get("step")},
    )
    if onnx:
        export_onnx(model, out / "onnx")
    return out


class _TowerWithNamedInputs(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module, names: list[str]):
        super().__init__()
        self.tower, self.names = tower, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.names, inputs, strict=True))).embedding


def export_onnx(model: AccordModel, out: Path, opset: int = 17) -> dict[str, Path]:
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


def save_backbone(
    model: AccordModel, cfg: TrainConfig, out: Path, dtype: str = "fp32", source: dict[str, Any] | None = None
) -> None:
    torch_dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    heads: dict[str, torch.Tensor] = {}
    towers_cfg = {}
    for modality, tower in model.towers.items():
        tcfg = cfg.model.towers[modality]
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
        }
    if model.fusion is not None:
        for name, t in model.fusion.state_dict().items():
            heads[f"fusion.{name}"] = t.detach().to(torch_dtype).contiguous()
    for kind in ("logit_scale", "logit_bias"):
        params = getattr(model, kind)
        if params is not None:
            for name, p in params.items():
                heads[f"{kind}.{name}"] = p.detach().float().contiguous()
    save_file(heads, str(out / "heads.safetensors"))
    if "text" in model.towers and cfg.data.text.tokenizer:
        from transformers import AutoTokenizer

        from accord.models.towers import resolve_local_dir

        AutoTokenizer.from_pretrained(resolve_local_dir(cfg.data.text.tokenizer)).save_pretrained(out / "tokenizer")
    model_cfg = {**to_dict(cfg.model), "towers": towers_cfg}
    preprocess = {m: to_dict(getattr(cfg.data, m)) for m in ("image", "video", "audio") if m in model.towers}
    if "text" in model.towers:
        preprocess["text"] = {"tokenizer": "tokenizer", "max_length": cfg.data.text.max_length}
    meta = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype,
        "embed_dim": cfg.model.embed_dim,
        "modalities": list(model.towers),
        "pairs": [list(p) for p in model.pairs],
        "model": model_cfg,
        "preprocess": preprocess,
        "source": source or {},
    }
    (out / "backbone.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "README.md").write_text(model_card(cfg, meta))


def model_card(cfg: TrainConfig, meta: dict[str, Any]) -> str:
    last_eval: dict[str, Any] = {}
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if any(k.startswith("eval/") for k in row):
                last_eval = row
    towers = ", ".join(f"{m} ({meta['model']['towers'][m]['kind']})" for m in meta["modalities"])
    lines = [
        "# accord backbone",
        "",
        f"Towers: {towers}; embedding size {meta['embed_dim']}; pairs {', '.join('-'.join(p) for p in meta['pairs'])}.",
        "",
        f"Trained by `accord train` on `{cfg.data.train}` for {meta['source'].get('step')} steps "
        f"({cfg.loss.kind} loss, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}).",
        "",
        "Load with `accord.load_backbone(DIR)` or `ConsistencyScorer.from_pretrained(DIR)`.",
        "",
    ]
    fusion = meta["model"].get("fusion")
    if fusion:
        lines += [
            f"Fusion head: {fusion['layers']} cross-attention layers of width {fusion['dim']}"
            f"{' (symmetric)' if fusion['symmetric'] else ''}, trained with mined hard negatives; "
            '`scorer.score(..., mode="fused")` gives the match probability of text pairs.',
            "",
        ]
    if last_eval:
        lines += [
            f"## Zero-shot retrieval at step {last_eval['step']} on `{cfg.data.val}`",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k[5:]} | {v:.4f} |" for k, v in last_eval.items() if k.startswith("eval/") and "/R@" in k]
    return "\n".join(lines) + "\n"


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
    args = p.parse_args(argv)
    if args.onnx and args.format != "accord":
        raise ValueError("--onnx: only with --format accord")
    out = export(args.checkpoint_dir, args.out, args.tag, args.dtype, args.onnx, args.format)
    print(f"exported {args.checkpoint_dir} -> {out}")
    return 0
