"""Can the captioning world's image tower place two objects at all, and after how much training?

The compositional experiment's probes (``accord experiment compositional``) find that the trained image embedding
holds neither the axis of a two-object scene (side by side or one above the other) nor which object is where. This
separates the architecture and training length from the contrastive signal: the same ViT
(``configs/captioning_world.yaml``'s image tower, random init, CLS token) is trained *supervised* on exactly those two
labels (the axis, and :func:`accord.worlds.scenes.arrangement`) over the world's training scenes of two objects, and
scored on its held-out ones after every epoch. If it needs many more epochs than the backbone gets, the backbone's
training length is the limit, whatever the loss asks for.

    .venv/bin/python bench/image_placement.py --shards bench_out/probe/seed0/world/shards --epochs 40 \
        [--positions sincos]

``--shards`` holds ``train/`` and ``heldout/`` shards of the captioning world (any run of the experiment writes them).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml
from PIL import Image

from accord.models.towers import fix_sincos_positions
from accord.shards.read import shard_items
from accord.worlds.scenes import RELATIONS, Scene, arrangement, axis

ROOT = Path(__file__).resolve().parent.parent


def two_object_scenes(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [N, 3, H, W] in [-1, 1], axis labels and arrangement labels (-1: both objects alike, no label)."""
    images, axes, places = [], [], []
    for item in shard_items(str(folder), with_json=True):
        scene = (json.loads(item.get("json") or "{}") or {}).get("scene")
        if not scene or scene.get("relation") is None:
            continue
        s = Scene.from_json(scene)
        img = item["image"] if isinstance(item["image"], Image.Image) else Image.open(io.BytesIO(item["image"]))
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        axes.append(int(axis(s) == "above"))
        place = arrangement(s)
        places.append(-1 if place is None else RELATIONS.index(place))
    return torch.stack(images), torch.tensor(axes), torch.tensor(places)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="a folder with train/ and heldout/ shards")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="the backbone's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--positions", choices=("learned", "sincos"), default="learned", help="the tower's model.towers.image.positions"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the per-epoch figures here")
    args = p.parse_args()
    (x, axis, place), (tx, taxis, tplace) = (two_object_scenes(args.shards / s) for s in ("train", "heldout"))
    hf = yaml.safe_load((ROOT / "configs" / "captioning_world.yaml").read_text())["model"]["towers"]["image"]["hf"]
    torch.manual_seed(args.seed)
    vit = transformers.ViTModel(transformers.ViTConfig(**hf), add_pooling_layer=False)
    if args.positions == "sincos":
        fix_sincos_positions(vit)
    head = torch.nn.Linear(hf["hidden_size"], 2 + len(RELATIONS))
    trained = [p for p in (*vit.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.1)
    print(f"{len(x)} training and {len(tx)} held-out scenes of two objects; ViT {hf}, {args.positions} positions")
    rows, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        vit.train()
        for batch in torch.randperm(len(x)).split(args.batch):
            out = head(vit(pixel_values=x[batch]).last_hidden_state[:, 0])
            labelled = place[batch] >= 0
            loss = F.cross_entropy(out[:, :2], axis[batch]) + F.cross_entropy(out[labelled, 2:], place[batch][labelled])
            opt.zero_grad()
            loss.backward()
            opt.step()
        vit.eval()
        with torch.no_grad():
            out = head(vit(pixel_values=tx).last_hidden_state[:, 0])
        labelled = tplace >= 0
        row = {
            "epoch": epoch,
            "axis": float((out[:, :2].argmax(1) == taxis).float().mean()),
            "arrangement": float((out[labelled, 2:].argmax(1) == tplace[labelled]).float().mean()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(
            f"epoch {epoch:3d}  held-out axis {row['axis']:.3f} (chance 0.5)  arrangement {row['arrangement']:.3f} "
            f"(chance 0.25)  {row['seconds']:.0f} s",
            flush=True,
        )
    first = next((r["epoch"] for r in rows if r["axis"] >= 0.9), None)
    print(f"first epoch with held-out axis >= 0.9: {first}; best arrangement {max(r['arrangement'] for r in rows):.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
