"""``accord experiment fusion``: does the cross-attention fusion head catch one-attribute-wrong captions that the cosine
between pooled embeddings misses?

render images ("a red circle on the left") and clips ("a blue square moving up") -> shards -> train tiny text, image
and video towers + the fusion head (2 CPU ranks, ZeRO-2, hard negatives) -> export -> on fresh renders:

- AUC of matched vs one-attribute-wrong captions (colour, shape, position, motion), cosine vs fused score;
- R@1 of medium->caption and caption->medium retrieval by cosine, and after reranking the cosine top-k by the
  fused score (a retrieved item counts when its caption is the query's).

Writes ``OUT/fusion.md``, ``OUT/fusion.json`` and ``OUT/fusion.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accord.consistency import Backbone, load_backbone
from accord.errors import InputError, command
from accord.evaluation.plots import pyplot
from accord.evaluation.retrieval import rerank_topk
from accord.models.towers import TowerOutput
from accord.pipeline import build_shards, export_backbone, fresh_output_dir, launch_training
from accord.shards.read import shard_items
from accord.worlds.attributes import ATTRIBUTES, generate_attributes, wrong_attribute

SIZES = {  # (train images, train videos, val images, val videos, epochs)
    "quick": (360, 288, 72, 72, 12),
    "full": (1440, 1152, 144, 144, 30),
}


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a matched score > a wrong score), ties counting half (Mann-Whitney U / (n_pos n_neg))."""
    diff = pos.float()[:, None] - neg.float()[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def _rows(enc: TowerOutput, idx: torch.Tensor) -> TowerOutput:
    return TowerOutput(enc.embedding[idx], enc.tokens[idx], enc.mask[idx])


def _fused(
    backbone: Any,
    text: TowerOutput,
    other: TowerOutput,
    modality: str,
    t_idx: torch.Tensor,
    o_idx: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    return torch.cat(
        [
            torch.sigmoid(
                backbone.match_logits(
                    _rows(text, t_idx[i : i + chunk]), _rows(other, o_idx[i : i + chunk]), modality
                ).float()
            )
            for i in range(0, len(t_idx), chunk)
        ]
    )


def _retrieval(
    backbone: Any, captions: list[str], media: TowerOutput, modality: str, ks: tuple[int, ...]
) -> dict[str, float]:
    """R@1 by cosine and after reranking the cosine top-k by the fused score; correct = same caption."""
    unique = sorted(set(captions))
    text = backbone.encode_all("text", unique)
    label = torch.tensor([unique.index(c) for c in captions])
    sims = media.embedding @ text.embedding.T  # [N media, C captions]
    out: dict[str, float] = {}
    for direction, s, q_label, t_label in (
        (f"{modality}->text", sims, label, torch.arange(len(unique))),
        (f"text->{modality}", sims.T, torch.arange(len(unique)), label),
    ):
        out[f"{direction}/R@1"] = float((t_label[s.argmax(1)] == q_label).float().mean())
        to_text = direction.endswith("->text")

        def fused_score(q: torch.Tensor, t: torch.Tensor, to_text: bool = to_text) -> torch.Tensor:
            return _fused(backbone, text, media, modality, *((t, q) if to_text else (q, t)))

        for k in ks:
            top, fused = rerank_topk(s, k, fused_score)
            best = top.gather(1, fused.argmax(1, keepdim=True))[:, 0]
            out[f"{direction}/R@1+rerank{k}"] = float((t_label[best] == q_label).float().mean())
    out["captions"] = len(unique)
    return out


@torch.no_grad()
def evaluate(backbone_dir: Path, val_shards: Path, seed: int = 0, ks: tuple[int, ...] = (5, 10)) -> dict[str, Any]:
    """AUC (matched vs one-attribute-wrong) and retrieval R@1 with / without reranking, per medium."""
    backbone = load_backbone(backbone_dir)
    if not isinstance(backbone, Backbone) or not backbone.has_fusion:
        raise InputError(f"{backbone_dir}: the fusion study needs an accord backbone with a fusion head")
    rng = np.random.default_rng(seed)
    items = list(shard_items(str(val_shards)))
    results: dict[str, Any] = {}
    for modality in ("image", "video"):
        chosen = [i for i in items if modality in i]
        if not chosen:
            continue
        captions = [i["text"].strip() for i in chosen]
        media = backbone.encode_all(modality, [i[modality] for i in chosen])
        matched_text = backbone.encode_all("text", captions)
        idx = torch.arange(len(captions))
        scores = {
            "cosine": (matched_text.embedding * media.embedding).sum(-1),
            "fused": _fused(backbone, matched_text, media, modality, idx, idx),
        }
        res: dict[str, Any] = {"n": len(chosen), "matched_mean": {k: float(v.mean()) for k, v in scores.items()}}
        for attribute in ATTRIBUTES:
            wrong = [wrong_attribute(c, attribute, rng) for c in captions]
            keep = torch.tensor([w is not None for w in wrong])
            if not keep.any():
                continue
            rows = keep.nonzero()[:, 0]
            wrong_text = backbone.encode_all("text", [w for w in wrong if w is not None])
            wrong_scores = {
                "cosine": (wrong_text.embedding * media.embedding[rows]).sum(-1),
                "fused": _fused(backbone, wrong_text, media, modality, torch.arange(len(rows)), rows),
            }
            res[attribute] = {
                kind: {
                    "auc": auc(scores[kind][rows], wrong_scores[kind]),
                    "paired_wins": float((scores[kind][rows] > wrong_scores[kind]).float().mean()),
                }
                for kind in scores
            }
        res["retrieval"] = _retrieval(backbone, captions, media, modality, ks)
        results[modality] = res
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| medium | wrong attribute | AUC cosine | AUC fused | paired wins cosine | paired wins fused |",
        "|---|---|---|---|---|---|",
    ]
    for modality, res in results.items():
        for attribute in ATTRIBUTES:
            if attribute in res:
                c, f = res[attribute]["cosine"], res[attribute]["fused"]
                lines.append(
                    f"| {modality} | {attribute} | {c['auc']:.3f} | {f['auc']:.3f} | "
                    f"{c['paired_wins']:.3f} | {f['paired_wins']:.3f} |"
                )
    first = next(iter(results.values()))["retrieval"]
    ks = sorted({int(k.rsplit("rerank", 1)[1]) for k in first if "+rerank" in k})
    lines += [
        "",
        "| retrieval | R@1 cosine | " + " | ".join(f"R@1 rerank top-{k}" for k in ks) + " | captions |",
        "|---" * (3 + len(ks)) + "|",
    ]
    for modality, res in results.items():
        r = res["retrieval"]
        for direction in (f"{modality}->text", f"text->{modality}"):
            reranked = [f"{v:.3f}" for k, v in r.items() if k.startswith(direction + "/R@1+rerank")]
            lines.append(f"| {direction} | {r[direction + '/R@1']:.3f} | {' | '.join(reranked)} | {r['captions']} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    labels, cos, fus = [], [], []
    for modality, res in results.items():
        for attribute in ATTRIBUTES:
            if attribute in res:
                labels.append(f"{modality}\n{attribute}")
                cos.append(res[attribute]["cosine"]["auc"])
                fus.append(res[attribute]["fused"]["auc"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, cos, 0.4, label="cosine")
    ax.bar(x + 0.2, fus, 0.4, label="fused")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC matched vs one-attribute-wrong")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@command("accord experiment fusion")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord experiment fusion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_out/fusion")
    p.add_argument("--quick", action="store_true", help="smaller world, fewer epochs (a few minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29581)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n_img, n_vid, v_img, v_vid, epochs = SIZES["quick" if args.quick else "full"]
    out = fresh_output_dir(Path(args.out), "accord experiment fusion")
    t0 = time.perf_counter()
    print("== rendering", flush=True)
    generate_attributes(out / "raw" / "train", n_img, n_vid, seed=args.seed)
    generate_attributes(out / "raw" / "val", v_img, v_vid, seed=args.seed + 1)
    print("== shards", flush=True)
    build_shards(out / "raw" / "train", out / "shards" / "train", samples_per_shard=48)
    build_shards(out / "raw" / "val", out / "shards" / "val", samples_per_shard=48)
    print(f"== training text, image, video towers + fusion head ({epochs} epochs, 2 ranks, ZeRO-2)", flush=True)
    launch_training(
        out / "shards" / "train", out / "shards" / "val", out / "run", epochs, args.port, "tiny_fusion.yaml"
    )
    export_backbone(out / "run", out / "backbone")
    print("== scoring", flush=True)
    results = evaluate(out / "backbone", out / "shards" / "val", seed=args.seed)
    md = table(results)
    summary = {
        "results": results,
        "sizes": dict(
            zip(
                ("train_images", "train_videos", "val_images", "val_videos", "epochs"),
                SIZES["quick" if args.quick else "full"],
                strict=True,
            )
        ),
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "fusion.json").write_text(json.dumps(summary, indent=1))
    (out / "fusion.md").write_text(md + "\n")
    plot(results, out / "fusion.png")
    print("\n" + md + f"\n\n{out / 'fusion.md'} ({summary['seconds']:.0f} s)")
    return 0
