"""The captioning world of the experiments: its plans, shards (training, held-out, validation) and backbones.

:func:`build_world` renders the world (:mod:`accord.worlds.scenes`) and builds its shards; :func:`validation_scenes`
adds fresh training-distribution scenes that no backbone or decoder trains on (where scores are calibrated and
decoding settings are chosen); :func:`train_backbone` trains a backbone with accord's trainer
(``configs/captioning_world.yaml`` + the overrides of a recipe of :data:`RECIPES`) and exports it. Every product is
reused when its folder holds one made the same way. ``accord experiment captioning`` and ``compositional`` share it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from accord.pipeline import build_shards, export_backbone, launch_training
from accord.resources import config_file
from accord.worlds.scenes import write_world


@dataclass(frozen=True)
class WorldPlan:
    train: int  # training scenes
    heldout: int  # evaluation scenes (each with a held-out part)
    backbone_epochs: int
    epochs: int  # caption decoder and language model from scratch (MLE)
    tune_epochs: int  # decoders tuned from the MLE one (continued MLE, + consistency loss, SCST)
    tune_scenes: int  # validation scenes the captioning guides are calibrated and the decoders' settings chosen on
    counterfactuals_first: str | None = None  # the change each rendered counterfactual makes where it applies


PLANS = {"quick": WorldPlan(400, 48, 3, 4, 1, 24), "full": WorldPlan(3000, 300, 8, 15, 4, 64)}


def world_stamp(plan: WorldPlan, seed: int) -> str:
    """What makes a world's files: a world (and a backbone trained on it) is reused only under the same stamp."""
    world: dict[str, object] = {"train": plan.train, "heldout": plan.heldout, "seed": seed, "counterfactuals": True}
    if plan.counterfactuals_first is not None:  # absent by default: the stamps of worlds built before it stay valid
        world["counterfactuals_first"] = plan.counterfactuals_first
    return json.dumps(world)


def build_world(out: Path, plan: WorldPlan, seed: int) -> tuple[Path, Path]:
    """Render the captioning world and build its shards (reused when ``out`` holds the same plan and seed).
    Returns (train shards, held-out shards)."""
    stamp = world_stamp(plan, seed)
    shards = out / "shards"
    if not ((out / "world.json").exists() and (out / "world.json").read_text() == stamp):
        # every training scene with its rendered counterfactual (used by recipes with data.counterfactuals)
        write_world(
            out / "raw",
            plan.train,
            plan.heldout,
            seed=seed,
            counterfactuals=True,
            counterfactuals_first=plan.counterfactuals_first,
        )
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
        {
            "epochs": plan.backbone_epochs,
            "seed": seed,
            "data": str(train),
            "world": world_stamp(plan, seed),  # a world rebuilt in the same folder another way is other data
            "overrides": overrides,
            "config": config,
        }
    )
    backbone = out / "backbone"
    if (out / "plan.json").exists() and (out / "plan.json").read_text() == stamp and backbone.exists():
        print(f"reusing the backbone in {out}", flush=True)
        return backbone
    t = time.perf_counter()
    epochs = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("epochs=")), plan.backbone_epochs)
    print(f"training the backbone on {plan.train} scenes (2 CPU ranks, {epochs} epochs)", flush=True)
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


VALIDATION_SCENES = 300  # training-distribution scenes no backbone or decoder trains on


def validation_scenes(world: Path, seed: int) -> Path:
    """Shards of :data:`VALIDATION_SCENES` fresh scenes drawn as the training ones are (built once per world): where
    the generative score's alpha, the guides' calibration and the decoders' settings are chosen, never on the
    held-out scenes they are evaluated on."""
    val = world / "shards" / "val"
    if not (val / "sizes.json").exists():
        write_world(world / "raw" / "val", VALIDATION_SCENES, 0, seed=seed + 2000, progress=False)
        build_shards(world / "raw" / "val" / "train", val, samples_per_shard=100)
    return val


# backbone recipes
CUT = ("model.towers.text.unfreeze_last_n=2", "model.towers.text.lr_scale=0.1")
FROZEN = ("model.towers.text.unfreeze_last_n=null",)
NO_NEGATIVES = ("loss.hard_negatives=null",)
ALL_NEGATIVES = ("loss.hard_negatives={per_caption: 2}",)
TRAINED_TYPES = ("replace colour", "replace shape", "replace relation")  # the others are unseen in training
SEEN_NEGATIVES = ("loss.hard_negatives={per_caption: 2, seen_only: true}",)
SOME_NEGATIVES = (f"loss.hard_negatives={{per_caption: 2, types: [{', '.join(TRAINED_TYPES)}]}}",)
LARGER_VIT = (
    "model.towers.image.hf={image_size: 64, patch_size: 8, hidden_size: 128, num_hidden_layers: 6, "
    "num_attention_heads: 4, intermediate_size: 256}",
)
GENERATIVE = ("model.generative={dim: 64, layers: 2, heads: 4}",)  # issue #27: the CoCa-style head
PAIRS_RENDERED = ("data.counterfactuals=true",)  # each scene's rendered counterfactual joins its batch (TripletCLIP)
SINCOS = ("model.towers.image.positions=sincos",)  # fixed 2D sine-cosine patch positions (MAE, MoCo v3)
FUSION_ORDER = ("model.fusion.text_positions=true",)  # the fusion head sees which object a caption names first
LONGER = ("epochs=40",)  # 5x the plan's 8 epochs: a supervised probe of the same ViT needs ~15 to place two objects
# name -> overrides of configs/captioning_world.yaml; each states the text tower and the negatives itself
RECIPES: dict[str, tuple[str, ...]] = {
    "frozen": (*FROZEN, *NO_NEGATIVES),
    "frozen + negatives": (*FROZEN, *ALL_NEGATIVES),
    "cut 2": (*CUT, *NO_NEGATIVES),
    "cut 2 + negatives": (*CUT, *ALL_NEGATIVES),
    "cut 2 + negatives of 3 types": (*CUT, *SOME_NEGATIVES),
    "cut 2 + seen-only negatives": (*CUT, *SEEN_NEGATIVES),
    "cut 2 + negatives, larger ViT": (*CUT, *ALL_NEGATIVES, *LARGER_VIT),
    "cut 2 + seen-only negatives + generative head": (*CUT, *SEEN_NEGATIVES, *GENERATIVE),
    "cut 2 + seen-only negatives + rendered pairs": (*CUT, *SEEN_NEGATIVES, *PAIRS_RENDERED),
    "cut 2 + rendered pairs": (*CUT, *NO_NEGATIVES, *PAIRS_RENDERED),
    "cut 2 + seen-only negatives + rendered pairs, larger ViT": (*CUT, *SEEN_NEGATIVES, *PAIRS_RENDERED, *LARGER_VIT),
    "cut 2 + seen-only negatives, 5x longer": (*CUT, *SEEN_NEGATIVES, *LONGER),
    "cut 2 + seen-only negatives, sincos positions": (*CUT, *SEEN_NEGATIVES, *SINCOS),
    "cut 2 + seen-only negatives, sincos positions, 5x longer": (*CUT, *SEEN_NEGATIVES, *SINCOS, *LONGER),
    "cut 2 + seen-only negatives + rendered pairs, sincos positions": (*CUT, *SEEN_NEGATIVES, *PAIRS_RENDERED, *SINCOS),
    "cut 2 + seen-only negatives + generative head, sincos positions": (*CUT, *SEEN_NEGATIVES, *GENERATIVE, *SINCOS),
    "cut 2 + seen-only negatives + rendered pairs, sincos positions, fusion word order": (
        *CUT,
        *SEEN_NEGATIVES,
        *PAIRS_RENDERED,
        *SINCOS,
        *FUSION_ORDER,
    ),
}
