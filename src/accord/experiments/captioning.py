"""``accord experiment captioning``: does a consistency score beat decoding and training without it?

    accord experiment captioning --backbone DIR --data TRAIN_SHARDS --val VAL_SHARDS [--modality image] [--quick]

The backbone stays frozen: its ``--modality`` tower's token features condition a small caption decoder, its text
tower scores captions. Trains one decoder per training strategy (MLE; MLE + soft consistency loss with expected
embeddings and with Gumbel-softmax; SCST with the consistency reward, started from the MLE decoder, without and
with an MLE term), decodes the validation media with every decoding strategy (greedy, beam, nucleus, N-best rerank
and consistency-guided beam at each ``--beta``), and
scores every variant: BLEU-4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), the consistency score (CLIPScore mode),
RefCLIPScore-style score, distinct-1/2 and mean length. Writes ``OUT/captioning.md``, ``.json`` and ``.png``.
Items used: shard samples with text and the chosen modality and no other medium.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from accord.captioning import (
    CaptionConsistency,
    Captioner,
    CaptionerConfig,
    CaptionTrainConfig,
    CaptionVocab,
    DecodeConfig,
    generate,
    train_captioner,
)
from accord.captioning.data import CaptionData
from accord.captioning.metrics import caption_metrics
from accord.errors import command

TRAININGS = {  # name -> (strategy overrides, start from)
    "MLE": ({"strategy": "mle"}, None),
    "MLE + consistency (expected)": ({"strategy": "consistency", "soft": "expected"}, None),
    "MLE + consistency (Gumbel)": ({"strategy": "consistency", "soft": "gumbel"}, None),
    "SCST (consistency reward)": ({"strategy": "scst"}, "MLE"),
    "SCST + MLE term (0.5)": ({"strategy": "scst", "scst_mle_weight": 0.5}, "MLE"),
}
METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "consistency", "RefCLIP-S", "distinct-1", "distinct-2",
           "mean_length")


def read_items(shards: str, modality: str) -> list[dict[str, Any]]:
    from accord.consistency.commands import MODS, shard_items

    return [i for i in shard_items(shards) if i.get("text") and modality in i
            and not any(m in i for m in MODS[1:] if m != modality)]


def decode_all(model: Captioner, data: CaptionData, cfg: DecodeConfig, consistency: CaptionConsistency,
               batch: int = 64) -> list[str]:
    seqs = [generate(model, data.memory[i : i + batch], data.mask[i : i + batch], cfg, data.media[i : i + batch],
                     consistency).seqs for i in range(0, len(data), batch)]
    return [c for s in seqs for c in consistency.vocab.decode(s)]


def consistency_scores(captions: list[str], data: CaptionData, scorer: Any, modality: str) -> dict[str, float]:
    """Mean CLIPScore-mode consistency and RefCLIPScore-style score of captions for ``data``'s media (a caching
    scorer embeds each distinct caption and reference once across modes and variants)."""
    refs = [[c] for c in data.captions]
    with torch.no_grad():
        clip_s = scorer.score(text=captions, embeddings={modality: data.media}, mode="clipscore").aggregate
        ref_s = scorer.score(text=captions, embeddings={modality: data.media}, mode="refclip",
                             references=refs).aggregate
    return {"consistency": float(clip_s.mean()), "RefCLIP-S": float(ref_s.mean())}


def run(backbone_dir: str, data: str, val: str, modality: str = "image", epochs: int = 15, scst_epochs: int = 5,
        betas: tuple[float, ...] = (1.0, 5.0), seed: int = 0, progress: bool = True) -> dict[str, Any]:
    from accord.consistency import ConsistencyScorer, load_backbone

    backbone = load_backbone(backbone_dir).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    train_items, val_items = read_items(data, modality), read_items(val, modality)
    vocab = CaptionVocab(backbone.tokenizer, [i["text"] for i in train_items])
    cap_cfg = CaptionerConfig()
    train_data = CaptionData.encode(backbone, vocab, train_items, modality, cap_cfg.max_len)
    val_data = CaptionData.encode(backbone, vocab, val_items, modality, cap_cfg.max_len)
    consistency = CaptionConsistency(backbone, vocab)
    decodings = {
        "greedy": DecodeConfig("greedy"),
        "beam": DecodeConfig("beam", beam=4),
        "sample": DecodeConfig("sample", top_p=0.9, seed=seed),
        **{f"rerank β={b:g}": DecodeConfig("rerank", candidates=8, beta=b, seed=seed) for b in betas},
        **{f"guided β={b:g}": DecodeConfig("guided", beam=4, guide_top_k=8, beta=b) for b in betas},
    }
    models: dict[str, Captioner] = {}
    rows, histories, captions = [], {}, {}
    for name, (overrides, start) in TRAININGS.items():
        torch.manual_seed(seed)
        model = copy.deepcopy(models[start]) if start else Captioner(cap_cfg, len(vocab), train_data.memory.shape[-1])
        cfg = CaptionTrainConfig(**overrides, epochs=scst_epochs if start else epochs, seed=seed,
                                 lr=2e-4 if start else 1e-3)
        histories[name] = train_captioner(model, train_data, cfg, consistency, progress=progress)
        models[name] = model
        for dec_name, dec in decodings.items():
            captions[(name, dec_name)] = decode_all(model, val_data, dec, consistency)
    captions[("references", "-")] = val_data.captions
    quality = caption_metrics({f"{t}|{d}": c for (t, d), c in captions.items()}, [[c] for c in val_data.captions])
    scorer = ConsistencyScorer(backbone, cache=True)
    for (name, dec_name), caps in captions.items():
        rows.append({"training": name, "decoding": dec_name, **quality[f"{name}|{dec_name}"],
                     **consistency_scores(caps, val_data, scorer, modality), "examples": caps[:5]})
    references = rows.pop()
    return {"rows": rows, "references": references, "history": histories, "modality": modality,
            "train_items": len(train_data), "val_items": len(val_data), "vocab": len(vocab), "betas": list(betas),
            "epochs": epochs, "scst_epochs": scst_epochs, "val_examples": val_data.captions[:5]}


def table(result: dict[str, Any]) -> str:
    head = "| training | decoding | " + " | ".join(METRICS) + " |"
    lines = [head, "|---" * (2 + len(METRICS)) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['training']} | {r['decoding']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    ref = result["references"]
    lines.append("| (the references themselves) | - | " + " | ".join(f"{ref[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    trainings = list(dict.fromkeys(r["training"] for r in result["rows"]))
    decodings = list(dict.fromkeys(r["decoding"] for r in result["rows"]))
    width = 0.8 / len(trainings)
    for ax, metric in zip(axes, ("CIDEr", "consistency"), strict=True):
        for i, t in enumerate(trainings):
            vals = [next(r[metric] for r in result["rows"] if r["training"] == t and r["decoding"] == d)
                    for d in decodings]
            ax.bar([j + i * width for j in range(len(decodings))], vals, width, label=t)
        ax.axhline(result["references"][metric], color="grey", ls="--", lw=0.8, label="references")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(decodings))], decodings)
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@command("accord experiment captioning")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord experiment captioning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="exported accord backbone directory")
    p.add_argument("--data", required=True, help="training shards")
    p.add_argument("--val", required=True, help="evaluation shards")
    p.add_argument("--modality", default="image", choices=("image", "video", "audio"))
    p.add_argument("--out", default="bench_out/captioning")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--scst-epochs", type=int, default=5)
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 5.0],
                   help="weights of the consistency score in rerank / guided (one row each)")
    p.add_argument("--quick", action="store_true", help="few epochs (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    epochs, scst = (3, 1) if args.quick else (args.epochs, args.scst_epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run(args.backbone, args.data, args.val, args.modality, epochs, scst, tuple(args.beta), args.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "accord experiment captioning " + " ".join(argv if argv is not None else [])
    (out / "captioning.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / "captioning.md").write_text(md + "\n")
    plot(result, out / "captioning.png")
    print("\n" + md + f"\n\n{out / 'captioning.md'} ({result['seconds']:.0f} s)")
    return 0
