"""How hard is it to read a relation off a trained backbone's token features: one hop or two?

Every score of the compositional experiment stays at chance on relations (``docs/recipes.md``), even on the pictures
it trained on. This asks whether the towers' token features are the limit, or the check itself. A fresh
cross-attention head (``accord.models.fusion.FusionHead``, the fusion head's architecture and size) is trained on
the frozen tokens of a backbone with a binary loss on one thing only, over two-object scenes of the captioning world:

- **two hops** (what the fused score must do): "a A <rel> a B" matches the picture and "a A <inverse rel> a B" does
  not: find A, find B, compare where they are, compare with the word;
- **one hop** (what a caption decoder does when it predicts the relation word after the first object, CoCa): "a A
  <rel>" against "a A <inverse rel>", the second object never named: find A and read where it is (two objects sit
  on either side of the centre, so that settles the relation).

``--text-positions`` gives the head a sine-cosine table of text token indices (``model.fusion.text_positions``):
without it the head's layers see a caption as a set of token features, and "A <rel> B" differs from "B <rel> A"
only by whatever order those features still carry. ``--raw`` replaces the image tower's tokens by the picture's
8 x 8 pixel patches with explicit sine-cosine patch coordinates, so that the head has every position exactly.
Scores are the share of scenes whose true caption gets the higher logit, on training scenes and on held-out scenes
of the same shards (never trained on by the head).

    .venv/bin/python bench/relation_hops.py --backbone DIR --shards WORLD/shards/train \
        [--raw] [--text-positions] [--hops 2 1] [--steps 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from accord.consistency.backbone import Backbone, load_backbone
from accord.errors import InputError, command
from accord.models.config import FusionConfig
from accord.models.fusion import FusionHead
from accord.shards.read import shard_items
from accord.worlds.scenes import INVERSE, RELATION_PHRASES, Scene

PATCH = 8


def distinct_pair_scenes(folder: Path, limit: int) -> tuple[list[Image.Image], list[Scene]]:
    """The first ``limit`` scenes of two different objects in ``folder``'s shards, with their pictures."""
    images, scenes = [], []
    for item in shard_items(str(folder), with_json=True):
        scene = (json.loads(item.get("json") or "{}") or {}).get("scene")
        if scene is None or scene.get("relation") is None:
            continue
        s = Scene.from_json(scene)
        if s.objects[0].words() == s.objects[1].words():
            continue
        img = item["image"] if isinstance(item["image"], Image.Image) else Image.open(io.BytesIO(item["image"]))
        images.append(img.convert("RGB"))
        scenes.append(s)
        if len(scenes) >= limit:
            break
    return images, scenes


def captions(scene: Scene, hops: int, inverted: bool) -> str:
    """One phrasing for every scene: "a A <rel> a B" (two hops) or "a A <rel>" (one hop), the relation inverted or
    not."""
    a, b = scene.objects
    relation = RELATION_PHRASES[INVERSE[scene.relation] if inverted else scene.relation]  # type: ignore[index]
    return f"a {a.words()} {relation} a {b.words()}" if hops == 2 else f"a {a.words()} {relation}"


def raw_patches(images: list[Image.Image]) -> torch.Tensor:
    """[N, P, 3 * 8 * 8 + 16]: pixel patches in [-1, 1] and each patch's row and column as sines and cosines."""
    px = torch.tensor(np.stack([np.asarray(im) for im in images])).float().permute(0, 3, 1, 2) / 127.5 - 1
    n, _, h, w = px.shape
    patches = px.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5)
    rows, cols = h // PATCH, w // PATCH
    patches = patches.reshape(n, rows * cols, -1)
    yy, xx = torch.meshgrid(torch.arange(rows).float(), torch.arange(cols).float(), indexing="ij")
    freqs = torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi / max(rows, cols)
    coords = [f(c.flatten()[:, None] * freqs) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat([patches, torch.cat(coords, dim=-1)[None].expand(n, -1, -1)], dim=-1)


def encode(backbone: Backbone, modality: str, inputs: list, chunk: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features [N, L, W] (fp32, padded) and masks of ``inputs``, without gradient."""
    toks, masks = [], []
    with torch.no_grad():
        for i in range(0, len(inputs), chunk):
            out = backbone.encode(modality, inputs[i : i + chunk])
            toks.append(out.tokens.float())
            masks.append(out.mask.to(torch.bool))
    length = max(t.shape[1] for t in toks)
    return (
        torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in toks]),
        torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]),
    )


def pad_to(x: torch.Tensor, m: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return F.pad(x, (0, 0, 0, length - x.shape[1])), F.pad(m, (0, length - m.shape[1]))


def train_probe(
    image: tuple[torch.Tensor, torch.Tensor],
    true: tuple[torch.Tensor, torch.Tensor],
    false: tuple[torch.Tensor, torch.Tensor],
    n_train: int,
    steps: int,
    lr: float,
    seed: int,
    every: int,
    label: str,
    text_positions: bool = False,
) -> list[dict[str, float]]:
    """A fresh head trained to give (true caption, picture) a higher match logit than (false caption, picture);
    its accuracy on training and held-out scenes every ``every`` steps."""
    torch.manual_seed(seed)
    (im, im_mask), (t, t_mask), (u, u_mask) = image, true, false
    length = max(t.shape[1], u.shape[1])
    (t, t_mask), (u, u_mask) = pad_to(t, t_mask, length), pad_to(u, u_mask, length)
    head = FusionHead(
        FusionConfig(dim=64, layers=2, heads=4, symmetric=True, text_positions=text_positions),
        {"text": t.shape[-1], "image": im.shape[-1]},
    )
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    n = im.shape[0]
    train_idx, test_idx = torch.arange(min(n_train, 1000)), torch.arange(n_train, n)

    def accuracy(idx: torch.Tensor) -> float:
        with torch.no_grad():
            a = head(t[idx], t_mask[idx], im[idx], im_mask[idx], "image")
            b = head(u[idx], u_mask[idx], im[idx], im_mask[idx], "image")
        return float((a > b).float().mean())

    curve = []
    for step in tqdm(range(1, steps + 1), desc=label, unit="step", leave=False):
        idx = torch.randint(0, n_train, (64,), generator=gen)
        a = head(t[idx], t_mask[idx], im[idx], im_mask[idx], "image")
        b = head(u[idx], u_mask[idx], im[idx], im_mask[idx], "image")
        loss = F.binary_cross_entropy_with_logits(torch.cat([a, b]), torch.cat([torch.ones(64), torch.zeros(64)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, "train": accuracy(train_idx), "heldout": accuracy(test_idx)})
    return curve


@command("bench/relation_hops.py")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", type=Path, required=True, help="an exported backbone (its text and image towers)")
    p.add_argument("--shards", type=Path, required=True, help="captioning-world shards with scene json")
    p.add_argument("--scenes", type=int, default=6000, help="two-object scenes read; 15%% of them held out")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=250, help="evaluate every so many steps")
    p.add_argument("--raw", action="store_true", help="pixel patches with explicit coordinates, not the ViT's tokens")
    p.add_argument(
        "--text-positions",
        action="store_true",
        help="the head adds sine-cosine token indices to the text (model.fusion.text_positions)",
    )
    p.add_argument("--hops", type=int, nargs="+", choices=(1, 2), default=[2, 1], help="which checks to train")
    p.add_argument("--json", type=Path, default=None, help="also write the curves here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    backbone = load_backbone(args.backbone)
    if not isinstance(backbone, Backbone):
        raise InputError(f"{args.backbone}: an accord backbone is needed (a HF CLIPModel has no token features here)")
    images, scenes = distinct_pair_scenes(args.shards, args.scenes)
    if len(scenes) < 100:
        raise InputError(f"{args.shards}: {len(scenes)} two-object scenes with scene json; need at least 100")
    n_train = int(len(scenes) * 0.85)
    if args.raw:
        patches = raw_patches(images)
        image = (patches, torch.ones(patches.shape[:2], dtype=torch.bool))
    else:
        image = encode(backbone, "image", images)
    curves = {}
    for hops in args.hops:
        true = encode(backbone, "text", [captions(s, hops, False) for s in scenes])
        false = encode(backbone, "text", [captions(s, hops, True) for s in scenes])
        label = "two hops" if hops == 2 else "one hop"
        curves[label] = train_probe(
            image, true, false, n_train, args.steps, args.lr, args.seed, args.every, label, args.text_positions
        )
    print(
        f"{len(scenes)} two-object scenes ({n_train} trained on), image tokens: "
        f"{'raw pixel patches + coordinates' if args.raw else str(args.backbone)}; {time.perf_counter() - t0:.0f} s"
    )
    print("| step | " + " | ".join(f"{k}: train | {k}: held-out" for k in curves) + " |")
    print("|---|" + "---|---|" * len(curves))
    for i, point in enumerate(next(iter(curves.values()))):
        cells = [f"{curves[k][i]['train']:.3f} | {curves[k][i]['heldout']:.3f}" for k in curves]
        print(f"| {point['step']} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
