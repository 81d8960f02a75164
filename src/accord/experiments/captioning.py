"""``accord experiment captioning``: does optimising a consistency score while generating beat generating without it?

    accord experiment captioning [--quick] [--seeds 0 1 2] [--out DIR]
    accord experiment captioning --backbone DIR --data TRAIN_SHARDS --val VAL_SHARDS [--modality image]

By default it builds the captioning world (:mod:`accord.worlds.scenes`: 64 px scenes of 1-3 objects with size,
colour, shape and relations; a held-out split of object kinds and placements never seen in training), turns it into
shards, trains the consistency backbone on the training split with accord's trainer (``configs/captioning_world.yaml``:
cut-layer MiniLM with hard negatives, ViT, fusion head; 2 CPU ranks, ZeRO-2) and exports it. ``--backbone`` with
``--data`` / ``--val`` uses any exported backbone and shards instead.

The backbone stays frozen. Per seed:

- **zero-shot** (no image-conditioned training): an image-blind language model trained on the training captions,
  decoded by contrastive search (unguided) and by MAGIC with the cosine / fused score as plug-in guide; CLIPRe, the
  training caption of highest cosine.
- **image-conditioned decoder** (its tower's token features condition a small transformer decoder), trained with
  MLE, then tuned from it with MLE + the differentiable consistency loss, SCST with the consistency reward without
  and with an MLE anchor, and (the control) MLE alone for the same extra steps.
  The MLE decoder is decoded greedy, beam, nucleus, N-best rerank and guided beam with the cosine and the fused
  score at every ``--beta``; the other trainings greedy, beam and cosine-guided beam at the largest beta.

Every variant is scored by the referee (:mod:`accord.worlds.referee`: captions parsed back and compared with the
rendered scene: attribute precision / recall, relation accuracy, hallucinated / missed objects), BLEU-4, METEOR,
ROUGE-L, CIDEr (pycocoevalcap; references: every phrasing of the scene), the backbone's cosine and fused scores,
distinct-1/2, mean length and decoding time per caption. Writes ``OUT/captioning.md``, ``.json`` and ``.png`` (mean
+- std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from accord.captioning import (
    CaptionConsistency,
    Captioner,
    CaptionerConfig,
    CaptionTrainConfig,
    CaptionVocab,
    DecodeConfig,
    HeadCaptioner,
    generate,
    train_captioner,
)
from accord.captioning.data import CaptionData
from accord.captioning.metrics import caption_metrics
from accord.captioning.model import Decoder
from accord.captioning.reward import MediaFeatures
from accord.captioning.zeroshot import magic, retrieve_captions
from accord.consistency import load_backbone
from accord.errors import InputError, command
from accord.evaluation.plots import pyplot
from accord.modalities import MEDIA
from accord.models.towers import TowerOutput
from accord.pipeline import build_shards, export_backbone, launch_training
from accord.resources import config_file
from accord.shards.read import shard_items
from accord.worlds.referee import referee
from accord.worlds.scenes import CHANGES, TEMPLATES, Scene, caption, one_change, write_world

# name -> (strategy overrides, start from): from scratch for plan.epochs, or tuned from the named decoder for
# plan.tune_epochs at lr 2e-4 ("MLE, continued" is the control: the same extra steps without a consistency signal)
TRAININGS: dict[str, tuple[dict[str, Any], str | None]] = {
    "MLE": ({"strategy": "mle"}, None),
    "MLE, continued": ({"strategy": "mle"}, "MLE"),
    "MLE + consistency loss": ({"strategy": "consistency", "soft": "expected"}, "MLE"),
    "SCST (consistency reward)": ({"strategy": "scst"}, "MLE"),
    "SCST + MLE anchor (0.5)": ({"strategy": "scst", "scst_mle_weight": 0.5}, "MLE"),
}
ZERO_SHOT = "zero-shot (image-blind LM)"
HEAD = "generative head (trained with the towers)"
# MAGIC's MS-COCO alpha / beta (Su et al. 2022), k = guide_top_k
MAGIC: dict[str, Any] = {"top_k": 8, "alpha": 0.1, "beta": 2.0}
REFEREE = ("attribute_precision", "attribute_recall", "relation_accuracy", "hallucinated_objects", "missed_objects")
SCORES = ("cosine", "fused")
LANGUAGE = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "distinct-1", "distinct-2", "mean_length")


@dataclass(frozen=True)
class WorldPlan:
    train: int
    heldout: int
    backbone_epochs: int
    epochs: int  # caption decoder and language model from scratch (MLE)
    tune_epochs: int  # decoders tuned from the MLE one (continued MLE, + consistency loss, SCST)


PLANS = {"quick": WorldPlan(400, 48, 3, 4, 1), "full": WorldPlan(3000, 300, 8, 15, 4)}


def build_world(out: Path, plan: WorldPlan, seed: int) -> tuple[Path, Path]:
    """Render the captioning world and build its shards (reused when ``out`` holds the same plan and seed).
    Returns (train shards, held-out shards)."""
    stamp = json.dumps({"train": plan.train, "heldout": plan.heldout, "seed": seed, "counterfactuals": True})
    shards = out / "shards"
    if not ((out / "world.json").exists() and (out / "world.json").read_text() == stamp):
        # every training scene with its rendered counterfactual (used by recipes with data.counterfactuals)
        write_world(out / "raw", plan.train, plan.heldout, seed=seed, counterfactuals=True)
        # at least 3 shards per split: 2 ranks (x 1 loader worker) each need one in finite mode
        build_shards(out / "raw" / "train", shards / "train", samples_per_shard=min(250, math.ceil(plan.train / 4)))
        build_shards(
            out / "raw" / "heldout", shards / "heldout", samples_per_shard=min(100, math.ceil(plan.heldout / 3))
        )
        (out / "world.json").write_text(stamp)
    return shards / "train", shards / "heldout"


def train_backbone(
    out: Path,
    train: Path,
    heldout: Path,
    plan: WorldPlan,
    seed: int,
    port: int,
    overrides: tuple[str, ...] = (),
    alpha_data: Path | None = None,
) -> Path:
    """Train the world's backbone (``configs/captioning_world.yaml`` + ``overrides``) into ``out/run`` and export
    it to ``out/backbone`` (reused when ``out`` holds one trained the same way: same overrides and config file;
    ``alpha_data``: validation shards a generative head's alpha is chosen on). Returns the backbone."""
    config = hashlib.sha256(config_file("captioning_world.yaml").read_bytes()).hexdigest()[:16]  # its recipe
    stamp = json.dumps(
        {"epochs": plan.backbone_epochs, "seed": seed, "data": str(train), "overrides": overrides, "config": config}
    )
    backbone = out / "backbone"
    if (out / "plan.json").exists() and (out / "plan.json").read_text() == stamp and backbone.exists():
        print(f"reusing the backbone in {out}", flush=True)
        return backbone
    t = time.perf_counter()
    print(f"training the backbone on {plan.train} scenes (2 CPU ranks, {plan.backbone_epochs} epochs)", flush=True)
    launch_training(
        train,
        heldout,
        out / "run",
        plan.backbone_epochs,
        port,
        config="captioning_world.yaml",
        overrides=(
            f"seed={seed}",
            f"data.seed={seed}",
            "data.batch_size=32",
            "optim.lr=2e-3",
            "optim.warmup_steps=20",
            *overrides,
        ),
    )
    export_backbone(out / "run", backbone, alpha_data)
    (out / "train_seconds").write_text(f"{time.perf_counter() - t:.1f}\n")
    (out / "plan.json").write_text(stamp)
    print(f"backbone ready in {time.perf_counter() - t:.0f} s", flush=True)
    return backbone


def prepare_world(out: Path, plan: WorldPlan, seed: int, port: int) -> tuple[Path, Path, Path]:
    """The captioning world's shards and its backbone trained with the shipped config (both reused when ``out``
    holds them). Returns (backbone, train shards, held-out shards)."""
    train, heldout = build_world(out, plan, seed)
    return train_backbone(out, train, heldout, plan, seed, port), train, heldout


def read_items(shards: str, modality: str) -> list[dict[str, Any]]:
    """Samples with text and ``modality`` and no other medium; ``scene`` when the sample's json has one."""
    items = []
    for i in shard_items(shards, with_json=True):
        if "error" in i:
            raise InputError(i["error"])
        if i.get("text") and modality in i and not any(m in i for m in MEDIA if m != modality):
            meta = json.loads(i.pop("json")) if i.get("json") else {}
            if "scene" in meta:
                i["scene"] = Scene.from_json(meta["scene"])
            items.append(i)
    return items


def references(items: list[dict[str, Any]]) -> list[list[str]]:
    """Every phrasing of the item's scene when it has one (the world's grammar), else its own caption."""
    return [
        [caption(i["scene"], t) for t in TEMPLATES[len(i["scene"].objects)]] if "scene" in i else [i["text"].strip()]
        for i in items
    ]


def decode_all(
    model: Decoder, data: CaptionData, cfg: DecodeConfig, consistency: CaptionConsistency, batch: int = 64
) -> list[str]:
    media = data.features()
    seqs = [
        generate(
            model, data.memory[i : i + batch], data.mask[i : i + batch], cfg, media[i : i + batch], consistency
        ).seqs
        for i in range(0, len(data), batch)
    ]
    return [c for s in seqs for c in consistency.vocab.decode(s)]


def _decoder(model: Decoder, data: CaptionData, cfg: DecodeConfig) -> Callable[[CaptionConsistency], list[str]]:
    """Decode ``data`` with ``model`` under ``cfg``, given the scorer to guide (or rerank) with."""
    return lambda consistency: decode_all(model, data, cfg, consistency)


def magic_all(
    lm: Captioner, media: MediaFeatures, consistency: CaptionConsistency, beta: float, batch: int = 64
) -> list[str]:
    """MAGIC captions of the image-blind ``lm`` for every medium (``beta`` = 0: its plain contrastive search)."""
    chunks = [media[i : i + batch] for i in range(0, len(media), batch)]
    seqs = [magic(lm, len(m), lm.cfg.max_len, consistency, m, **{**MAGIC, "beta": beta}).seqs for m in chunks]
    return [c for s in seqs for c in consistency.vocab.decode(s)]


@torch.no_grad()
def pair_scores(
    backbone: Any, captions: list[str], media: MediaFeatures, modality: str, chunk: int = 128
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cosine [N] and (with a fusion head) match probability [N] of every caption with its media row."""
    cos, fused = [], []
    for i in range(0, len(captions), chunk):
        text = backbone.encode("text", [c or "" for c in captions[i : i + chunk]])
        rows = media[i : i + chunk]
        cos.append((text.embedding.float() * rows.embedding).sum(-1))
        if backbone.has_fusion:
            other = TowerOutput(rows.embedding, rows.tokens.to(text.tokens.dtype), rows.mask)
            fused.append(torch.sigmoid(backbone.match_logits(text, other, modality).float()))
    return torch.cat(cos), torch.cat(fused) if fused else None


def backbone_scores(backbone: Any, captions: list[str], media: MediaFeatures, modality: str) -> dict[str, float]:
    """Mean cosine and mean match probability (NaN without a fusion head)."""
    cos, fused = pair_scores(backbone, captions, media, modality)
    return {"cosine": float(cos.mean()), "fused": float(fused.mean()) if fused is not None else float("nan")}


def score_sensitivity(
    backbone: Any, items: list[dict[str, Any]], media: MediaFeatures, modality: str, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What the score can see: per change (one object's colour / shape / size, the relation inverted), the share of
    scenes whose true caption scores above the same phrasing of the changed scene (0.5: blind to it). A guide can
    only pass on what this shows."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for what in CHANGES:
        rows, true, changed = [], [], []
        for k, item in enumerate(items):
            other = one_change(item["scene"], what, rng)
            if other is not None:
                template = TEMPLATES[len(other.objects)][int(rng.integers(len(TEMPLATES[len(other.objects)])))]
                rows.append(k)
                true.append(caption(item["scene"], template))
                changed.append(caption(other, template))
        if not rows:
            continue
        sub = media[torch.tensor(rows)]
        (cos_t, fused_t), (cos_c, fused_c) = (pair_scores(backbone, c, sub, modality) for c in (true, changed))
        out[what] = {
            "scenes": len(rows),
            "cosine": float((cos_t > cos_c).float().mean()),
            "fused": float((fused_t > fused_c).float().mean())
            if fused_t is not None and fused_c is not None
            else float("nan"),
        }
    return out


def run_seed(
    backbone: Any,
    train_data: CaptionData,
    val_data: CaptionData,
    vocab: CaptionVocab,
    val_items: list[dict[str, Any]],
    modality: str,
    plan: WorldPlan,
    betas: tuple[float, ...],
    seed: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every captioner of one seed, decode the held-out media with every strategy and score each variant."""
    guides = ("cos",) + (("fused",) if backbone.has_fusion else ()) + (("gen",) if backbone.has_generative else ())
    kinds: dict[str, Literal["cosine", "fused", "generative"]] = {
        "cos": "cosine",
        "fused": "fused",
        "gen": "generative",
    }
    cap_cfg = CaptionerConfig()
    # (training, decoding) -> (decode with a fresh scorer, the scorer's kind): every variant is timed from an empty
    # caption cache, as one decoding run would be
    Decode = Callable[[CaptionConsistency], list[str]]
    variants: dict[tuple[str, str], tuple[Decode, str]] = {}

    # zero-shot: the image-blind language model (unguided / MAGIC) and CLIPRe
    torch.manual_seed(seed)
    lm = Captioner(cap_cfg, len(vocab), train_data.memory.shape[-1])
    train_captioner(lm, train_data.image_blind(), CaptionTrainConfig(epochs=plan.epochs, seed=seed), progress=progress)
    media = val_data.features()
    variants[(ZERO_SHOT, "contrastive search (unguided)")] = (lambda g: magic_all(lm, media, g, 0.0), "cos")
    for guide in guides:
        variants[(ZERO_SHOT, f"MAGIC {guide} β={MAGIC['beta']:g}")] = (
            lambda g: magic_all(lm, media, g, MAGIC["beta"]),
            guide,
        )
    distinct = sorted(set(train_data.captions))  # the retrieval index, built once (not in CLIPRe's time)
    caption_emb = backbone.encode_all("text", distinct).embedding.float()
    variants[("retrieval", "CLIPRe (cosine)")] = (
        lambda g: retrieve_captions(val_data.media, caption_emb, distinct)[0],
        "cos",
    )

    # the image-conditioned decoder under every training strategy
    top = max(betas)
    mle_decodings = {
        "greedy": DecodeConfig("greedy"),
        "beam": DecodeConfig("beam", beam=4),
        "sample": DecodeConfig("sample", top_p=0.9, seed=seed),
        **{
            f"rerank {g} β={b:g}": DecodeConfig("rerank", candidates=8, beta=b, seed=seed)
            for g in guides
            for b in betas
        },
        **{f"guided {g} β={b:g}": DecodeConfig("guided", beam=4, guide_top_k=8, beta=b) for g in guides for b in betas},
    }
    other_decodings = {k: mle_decodings[k] for k in ("greedy", "beam", f"guided cos β={top:g}")}
    reward = CaptionConsistency(backbone, vocab, "cosine", modality)  # the training signal (cosine)
    models: dict[str, Captioner] = {}
    for name, (overrides, start) in TRAININGS.items():
        torch.manual_seed(seed)
        model = copy.deepcopy(models[start]) if start else Captioner(cap_cfg, len(vocab), train_data.memory.shape[-1])
        cfg = CaptionTrainConfig(
            **overrides, epochs=plan.tune_epochs if start else plan.epochs, seed=seed, lr=2e-4 if start else 1e-3
        )
        train_captioner(model, train_data, cfg, reward, progress=progress)
        models[name] = model
        for dec_name, dec in (mle_decodings if name == "MLE" else other_decodings).items():
            guide = dec_name.split()[1] if dec.strategy in ("rerank", "guided") else "cos"
            variants[(name, dec_name)] = (_decoder(model, val_data, dec), guide)
    if backbone.has_generative:  # the decoder trained with the towers (issue #27), as is and fine-tuned by MLE
        head = HeadCaptioner(backbone, vocab, modality, cap_cfg)
        tuned = copy.deepcopy(head)
        cfg = CaptionTrainConfig(strategy="mle", epochs=plan.tune_epochs, seed=seed, lr=2e-4)
        train_captioner(tuned, train_data, cfg, reward, progress=progress)
        for name, decoder in ((HEAD, head), (f"{HEAD} + MLE", tuned)):
            for dec_name, dec in other_decodings.items():
                guide = dec_name.split()[1] if dec.strategy in ("rerank", "guided") else "cos"
                variants[(name, dec_name)] = (_decoder(decoder, val_data, dec), guide)

    captions, seconds = {}, {}
    for key, (decode, guide) in tqdm(
        variants.items(), desc=f"decode (seed {seed})", unit="variant", disable=not progress
    ):
        scorer = CaptionConsistency(backbone, vocab, kinds[guide], modality)
        t = time.perf_counter()
        captions[key] = decode(scorer)
        seconds[key] = time.perf_counter() - t
    captions[("references", "-")] = val_data.captions
    seconds[("references", "-")] = float("nan")
    return score_variants(backbone, captions, seconds, val_data, val_items, modality, seed)


def score_variants(
    backbone: Any,
    captions: dict[tuple[str, str], list[str]],
    seconds: dict[tuple[str, str], float],
    val_data: CaptionData,
    val_items: list[dict[str, Any]],
    modality: str,
    seed: int,
) -> list[dict[str, Any]]:
    refs = references(val_items)
    quality = caption_metrics({f"{t}|{d}": c for (t, d), c in captions.items()}, refs)
    truths = [i["scene"] for i in val_items] if all("scene" in i for i in val_items) else None
    media = val_data.features()
    rows = []
    for (training, decoding), caps in captions.items():
        row = {
            "training": training,
            "decoding": decoding,
            "seed": seed,
            **quality[f"{training}|{decoding}"],
            **backbone_scores(backbone, caps, media, modality),
            "ms_per_caption": 1000 * seconds[(training, decoding)] / len(caps),
            "examples": caps[:6],
        }
        if truths is not None:
            row.update(referee(caps, truths))
        rows.append(row)
    return rows


def run(
    backbone_dir: str | Path,
    data: str | Path,
    val: str | Path,
    modality: str = "image",
    plan: WorldPlan = PLANS["full"],
    betas: tuple[float, ...] = (1.0, 5.0),
    seeds: tuple[int, ...] = (0, 1, 2),
    progress: bool = True,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Every variant over ``seeds`` (the backbone and data fixed; seeds vary the captioners' initialisation, data
    order and sampling): per-seed rows and their mean / std. ``partial``: the rows so far, written after each seed."""
    backbone = load_backbone(str(backbone_dir)).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    train_items, val_items = read_items(str(data), modality), read_items(str(val), modality)
    for option, path, items in (("--data", data, train_items), ("--val", val, val_items)):
        if not items:
            raise InputError(f"{option} {path}: no samples with a caption and {modality} alone")
    vocab = CaptionVocab(backbone.tokenizer, [i["text"] for i in train_items])
    max_len = CaptionerConfig().max_len
    train_data = CaptionData.encode(backbone, vocab, train_items, modality, max_len)
    val_data = CaptionData.encode(backbone, vocab, val_items, modality, max_len)
    sensitivity = (
        score_sensitivity(backbone, val_items, val_data.features(), modality)
        if all("scene" in i for i in val_items)
        else {}
    )
    rows = []
    for seed in seeds:
        rows += run_seed(backbone, train_data, val_data, vocab, val_items, modality, plan, betas, seed, progress)
        if partial is not None:
            partial.write_text(json.dumps({"seeds_done": seeds[: seeds.index(seed) + 1], "rows": rows}, indent=1))
    return {
        "rows": rows,
        "summary": summarise(rows),
        "sensitivity": sensitivity,
        "modality": modality,
        "seeds": list(seeds),
        "train_items": len(train_data),
        "val_items": len(val_data),
        "vocab": len(vocab),
        "betas": list(betas),
        "plan": plan.__dict__,
        "referee": "scene" in val_items[0],
        "val_examples": val_data.captions[:6],
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (over seeds) of every numeric figure, per (training, decoding), in first-seen order."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        out.setdefault(
            (r["training"], r["decoding"]), {"training": r["training"], "decoding": r["decoding"], "runs": []}
        )["runs"].append(r)
    summary = []
    for entry in out.values():
        runs = entry.pop("runs")
        for k, v in runs[0].items():
            if isinstance(v, float | int) and k != "seed":
                vals = torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)
                entry[k] = float(vals.mean())
                entry[k + "_std"] = float(vals.std()) if len(vals) > 1 else 0.0
        entry["seeds"] = len(runs)
        entry["examples"] = runs[0]["examples"]
        summary.append(entry)
    return summary


def _cell(r: dict[str, Any], k: str) -> str:
    v = r.get(k, float("nan"))
    if math.isnan(v):
        return "-"
    digits = 1 if k == "ms_per_caption" else 3
    return f"{v:.{digits}f} ± {r[k + '_std']:.{digits}f}" if r.get("seeds", 1) > 1 else f"{v:.{digits}f}"


def table(result: dict[str, Any], columns: tuple[str, ...]) -> str:
    names = {
        "attribute_precision": "attr P",
        "attribute_recall": "attr R",
        "relation_accuracy": "relation acc",
        "hallucinated_objects": "halluc. obj",
        "missed_objects": "missed obj",
        "ms_per_caption": "ms/caption",
        "mean_length": "length",
    }
    lines = [
        "| training | decoding | " + " | ".join(names.get(c, c) for c in columns) + " |",
        "|---" * (2 + len(columns)) + "|",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['training']} | {r['decoding']} | " + " | ".join(_cell(r, c) for c in columns) + " |")
    return "\n".join(lines)


def sensitivity_table(result: dict[str, Any]) -> str:
    lines = ["| change | scenes | cosine | fused |", "|---|---|---|---|"]
    for what, r in result["sensitivity"].items():
        fused = "-" if math.isnan(r["fused"]) else f"{r['fused']:.3f}"
        lines.append(f"| {what} | {r['scenes']} | {r['cosine']:.3f} | {fused} |")
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    first = (*REFEREE, *SCORES, "ms_per_caption") if result["referee"] else (*SCORES, "ms_per_caption")
    out = (
        f"Referee and backbone scores (mean ± std over seeds {result['seeds']}):\n\n"
        + table(result, first)
        + "\n\nReference-based metrics:\n\n"
        + table(result, LANGUAGE)
    )
    if result.get("sensitivity"):
        out += (
            "\n\nWhat the score sees: share of evaluation scenes whose true caption scores above the same "
            "phrasing with one thing changed (0.5 = blind):\n\n" + sensitivity_table(result)
        )
    return out


def _marker(decoding: str) -> str:
    for prefix, marker in (("rerank", "s"), ("guided", "^"), ("MAGIC", "P"), ("CLIPRe", "*"), ("contrastive", "X")):
        if decoding.startswith(prefix):
            return marker
    return "o"  # greedy, beam, sample


def plot(result: dict[str, Any], path: Path) -> None:
    """The score the strategies optimise (cosine) against what the referee finds: a variant right of another but
    not above it gains score without gaining truth. Colour: training; marker: decoding; grey: the references."""
    plt = pyplot()
    ref = next(r for r in result["summary"] if r["training"] == "references")
    every = [r for r in result["summary"] if r["training"] != "references"]
    rows = [r for r in every if r["cosine"] >= ref["cosine"] - 0.1]  # far-off rows would squeeze the rest
    ys = (
        ("attribute_precision", "attribute_recall", "missed_objects")
        if result["referee"]
        else ("CIDEr", "METEOR", "ROUGE-L")
    )
    fig, axes = plt.subplots(1, len(ys), figsize=(16, 5))
    groups = list(dict.fromkeys(r["training"] for r in rows))
    colours = plt.get_cmap("tab10")
    for ax, y in zip(axes, ys, strict=True):
        for r in rows:
            ax.errorbar(
                r["cosine"],
                r[y],
                xerr=r["cosine_std"],
                yerr=r[y + "_std"],
                fmt=_marker(r["decoding"]),
                color=colours(groups.index(r["training"]) % 10),
                ms=6,
                capsize=2,
                alpha=0.85,
            )
        ax.plot(ref["cosine"], ref[y], "D", color="grey", ms=7)
        ax.set_xlabel("backbone cosine (the optimised score)")
        ax.set_ylabel(y.replace("_", " ") + (" (referee)" if result["referee"] else ""))
        ax.grid(alpha=0.3)
    trainings = [plt.Line2D([], [], marker="o", ls="", color=colours(i % 10), label=g) for i, g in enumerate(groups)]
    shown = {_marker(r["decoding"]) for r in rows} | {"D"}
    decodings = [
        plt.Line2D([], [], marker=m, ls="", color="black", label=label)
        for m, label in (
            ("o", "greedy / beam / sample"),
            ("s", "rerank"),
            ("^", "guided beam"),
            ("X", "image-blind LM"),
            ("P", "MAGIC"),
            ("*", "CLIPRe"),
            ("D", "references"),
        )
        if m in shown
    ]
    axes[0].legend(handles=trainings, fontsize=7, loc="lower left")
    axes[-1].legend(handles=decodings, fontsize=7, loc="best")
    left_out = (
        f"; {len(every) - len(rows)} variants of cosine < references - 0.1 in the table only"
        if len(rows) < len(every)
        else ""
    )
    fig.suptitle(f"{result['val_items']} evaluation scenes, mean ± std over seeds {result['seeds']}{left_out}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@command("accord experiment captioning")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord experiment captioning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbone", help="an exported accord backbone (default: train one on the captioning world)")
    p.add_argument("--data", help="training shards (with --backbone)")
    p.add_argument("--val", help="evaluation shards (with --backbone)")
    p.add_argument("--modality", default="image", choices=("image", "video", "audio"))
    p.add_argument("--out", default="bench_out/captioning")
    p.add_argument("--quick", action="store_true", help="a small world and few epochs (a smoke run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="captioner seeds (mean ± std over them)")
    p.add_argument("--world-seed", type=int, default=0, help="seeds the world and the backbone's training")
    p.add_argument(
        "--beta",
        type=float,
        nargs="+",
        default=[1.0, 5.0],
        help="weights of the consistency score in rerank / guided beam (one row each)",
    )
    p.add_argument("--port", type=int, default=29591)
    args = p.parse_args(argv)
    given = [o for o in ("backbone", "data", "val") if getattr(args, o)]
    if given and len(given) < 3:
        missing = ", ".join(f"--{o}" for o in ("backbone", "data", "val") if o not in given)
        raise InputError(f"{', '.join('--' + o for o in given)} needs {missing} too (or none of them: the world)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = PLANS["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if given:
        backbone, data, val = args.backbone, args.data, args.val
        for option, path in (("--backbone", backbone), ("--data", data), ("--val", val)):
            if "://" not in str(path) and not Path(path).exists():
                raise InputError(f"{option} {path}: no such folder")
    else:
        backbone, data, val = prepare_world(out / "world", plan, args.world_seed, args.port)
    result = run(
        backbone,
        data,
        val,
        args.modality,
        plan,
        tuple(args.beta),
        tuple(args.seeds),
        partial=out / "captioning.partial.json",
    )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "accord experiment captioning " + " ".join(argv if argv is not None else [])
    (out / "captioning.json").write_text(json.dumps(result, indent=1))
    md = tables(result)
    (out / "captioning.md").write_text(md + "\n")
    plot(result, out / "captioning.png")
    print("\n" + md + f"\n\n{out / 'captioning.md'} ({result['seconds']:.0f} s)")
    return 0
