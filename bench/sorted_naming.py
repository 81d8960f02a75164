"""A captioning world whose two-object captions always name the objects in sorted order: is word order the limit?

In the captioning world a placement is captioned both ways ("a red circle to the left of a blue square", "a blue
square to the right of a red circle"), so the relation word alone says nothing about the picture: a text embedding
must bind the word to the order the objects are named in. Here every two-object caption (training, counterfactual,
held-out, validation and minimal-pair scenes, and the scene json the negatives are built from) names first the
object whose words sort first, with the relation inverted where that swaps them; the pictures are unchanged. The
relation word then says where the sorted-first object is. If the score reads relations in this world, the text
side's word order was the limit.

    .venv/bin/python bench/sorted_naming.py --out bench_out/sorted_naming
    accord experiment compositional --recipes "cut 2 + seen-only negatives + rendered pairs, sincos positions" \\
        --seeds 0 --counterfactuals-first relation --out bench_out/sorted_naming

The experiment reuses the world (its stamp is the default world's, relation-first counterfactuals) and trains and
evaluates on the rewritten captions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

from accord.errors import InputError, command
from accord.experiments.compositional import PAIRS, minimal_pairs
from accord.experiments.scene_world import PLANS, build_world, validation_scenes
from accord.pipeline import build_shards
from accord.worlds.referee import parse
from accord.worlds.scenes import INVERSE, TEMPLATES, Scene, caption


def sorted_scene(scene: Scene) -> Scene:
    """The same picture with the object whose words sort first named first."""
    a, b = scene.objects
    return Scene((b, a), INVERSE[scene.relation]) if a.words() > b.words() else scene  # type: ignore[index]


def two_object_template(text: str) -> str:
    """Which of the world's two-object phrasings ``text`` is in."""
    if " with a " in text:
        return TEMPLATES[2][2]
    return TEMPLATES[2][1] if text.startswith("there is") else TEMPLATES[2][0]


def rewrite(folder: Path) -> int:
    """Rewrite ``folder``'s two-object captions and scene json to sorted naming; the number of captions changed."""
    changed = 0
    for txt in sorted(folder.glob("*.txt")):
        text = txt.read_text().strip()
        scene = parse(text).scene()
        if scene is None or scene.relation is None:
            continue
        new = caption(sorted_scene(scene), two_object_template(text))
        if parse(new).scene() != sorted_scene(scene):
            raise RuntimeError(f"{txt}: {new!r} does not parse back to its scene")  # a bug, not bad input
        if new != text:
            txt.write_text(new + "\n")
            changed += 1
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text())
        if (meta.get("scene") or {}).get("relation"):
            meta["scene"] = sorted_scene(Scene.from_json(meta["scene"])).to_json()
            path.write_text(json.dumps(meta))
    return changed


@command("bench/sorted_naming.py")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the experiment's --out folder (seed 0's world)")
    args = p.parse_args(argv)
    world = args.out / "seed0" / "world"
    if (world / "sorted_naming").exists():
        raise InputError(f"{world}: already rewritten")
    plan = dataclasses.replace(PLANS["full"], counterfactuals_first="relation")
    build_world(world, plan, 0)
    validation_scenes(world, 0)
    minimal_pairs(world, PAIRS["full"], 0)
    splits = {
        "train": (world / "raw" / "train", min(250, math.ceil(plan.train / 4))),
        "heldout": (world / "raw" / "heldout", min(100, math.ceil(plan.heldout / 3))),
        "val": (world / "raw" / "val" / "train", 100),
        "pairs": (world / "raw" / "pairs", 100),
    }
    for split, (raw, per_shard) in splits.items():
        print(f"{split}: {rewrite(raw)} captions renamed in sorted order", flush=True)
        shutil.rmtree(world / "shards" / split)
        build_shards(raw, world / "shards" / split, samples_per_shard=per_shard)
    (world / "sorted_naming").write_text("two-object captions name the sorted-first object first\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
