"""``accord experiment captioning``: does optimising a consistency score while generating raise the truth, or only
the score?

    accord experiment captioning [--quick] [--seeds 0 1 2] [--backbones NAME ...] [--out DIR]
    accord experiment captioning --backbone DIR --data TRAIN --val EVAL [--tune TUNE] [--modality image]

By default it builds the captioning world (:mod:`accord.experiments.scene_world`: 64 px scenes of 1-3 objects, a
held-out split of object kinds and placements never seen in training, and validation scenes drawn as the training
ones are) and, per seed, trains one backbone per recipe of ``--backbones`` with accord's trainer (default
:data:`BACKBONES`: the frozen text tower of captioning v2, the compositional study's winner, and the winner with the
CoCa-style generative head), so the spread over seeds includes the score itself. ``--backbone`` with ``--data`` /
``--val`` uses one exported backbone and any shards instead (``--tune``: the validation shards; default: the last
tenth of ``--data``, kept out of every training).

Per backbone and seed (the decoders' seed is the backbone's):

- **guides**: each score the backbone has (cosine ``cos``, the fusion head's ``fused``, the generative head's
  ``gen``) standardised on validation pairs (:func:`accord.captioning.guides.calibrate`), their ensemble ``ens``
  (mean of the z-values; ``--ensemble min``), and ``ens + fluency``: the ensemble guarded by a fluency head trained
  to tell the training captions from repeated / dropped / inserted / swapped / shuffled words, reading word
  classes (colours, sizes, nouns, relation words: syntax, not which words go together;
  :mod:`accord.captioning.fluency`).
- **zero-shot**: an image-blind language model decoded by contrastive search and by MAGIC with the guides; CLIPRe.
- **image-conditioned decoder** trained by MLE; from it MLE continued (the control), MLE + consistency loss, SCST
  with the cosine reward without and with an MLE anchor, and SCST with the fluency-guarded reward. The MLE decoder
  is decoded greedy, beam, by reranking its own 8 nucleus samples with every guide, and by guided beam; with a
  generative head, the head itself (as is and tuned by MLE) is decoded too.
- **tuning**: rerank / guided beta and MAGIC's alpha / beta are chosen on the validation scenes (the referee's mean
  correctness there), never on the evaluation scenes; the search is in the result.
- **figures** per variant: the referee (attribute precision / recall / F1, relation accuracy, hallucinated / missed
  objects, correctness), every guide's score, BLEU-4, METEOR, ROUGE-L, CIDEr, distinct-1/2, repetition, length,
  ms per caption, and the **gaming index** (:mod:`accord.captioning.trust`; against the unguided greedy decoder of
  the same family). Per guide: what it sees (the share of evaluation scenes whose true caption beats one change)
  and its Spearman correlation with the referee over the MLE decoder's own candidates.

Writes ``OUT/captioning.md``, ``.json`` and ``.png`` (mean +- std over seeds); each finished backbone-seed is kept
in ``OUT/runs/``, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
from accord.captioning.decode import rerank, sample
from accord.captioning.fluency import FluencyHead, fluency_accuracy, train_fluency, word_classes
from accord.captioning.guides import Ensemble, Guarded, Scorer, Standardised, calibrate
from accord.captioning.metrics import EMPTY, caption_metrics
from accord.captioning.model import Decoder
from accord.captioning.reward import MediaFeatures
from accord.captioning.trust import candidate_spearman, gaming_index
from accord.captioning.zeroshot import magic, retrieve_captions
from accord.consistency import load_backbone
from accord.data.negatives import Vocabulary
from accord.errors import InputError, command
from accord.evaluation.plots import pyplot
from accord.experiments.scene_world import (
    PLANS,
    RECIPES,
    WorldPlan,
    build_world,
    train_backbone,
    validation_scenes,
)
from accord.modalities import MEDIA
from accord.shards.read import shard_items
from accord.worlds.referee import judge, referee
from accord.worlds.scenes import CHANGES, TEMPLATES, Scene, caption, changed_captions

# the backbones compared (recipes of accord.experiments.scene_world): captioning v2's, the compositional study's
# winner (configs/captioning_world.yaml), and the winner with the CoCa-style generative head
BACKBONES = ("frozen", "cut 2 + seen-only negatives", "cut 2 + seen-only negatives + generative head")
KINDS: dict[str, Literal["cosine", "fused", "generative"]] = {"cos": "cosine", "fused": "fused", "gen": "generative"}
ENSEMBLE = "ens"
FLUENT = " + fluency"
GUARDED = ENSEMBLE + FLUENT
FLUENCY_WEIGHT = 1.0  # of the fluency log-probability beside a guide's z-value
BETAS = (0.1, 0.3, 1.0, 3.0)  # rerank: weight of the guide's z-value beside the log-likelihood (tuned)
GUIDED_BETAS = (0.1, 0.3, 1.0)  # guided beam: the same (tuned; larger ones broke every caption in the quick run)
MAGIC_GRID = ((0.1, 0.5), (0.1, 1.0), (0.1, 2.0), (0.3, 1.0))  # (alpha, beta), tuned; MS-COCO's is (0.1, 2)
MAGIC_TOP_K = 8
CANDIDATES = 8  # nucleus samples per medium that rerank picks from (and the Spearman figure ranks)
ZERO_SHOT = "zero-shot (image-blind LM)"
HEAD = "generative head (trained with the towers)"
# name -> (training overrides, start from, reward): from scratch for plan.epochs, or tuned from the named decoder
# for plan.tune_epochs at lr 2e-4 ("MLE, continued" is the control: the same extra steps without a consistency
# signal); the reward is the raw cosine, or the cosine guarded by the fluency head
TRAININGS: dict[str, tuple[dict[str, Any], str | None, str]] = {
    "MLE": ({"strategy": "mle"}, None, "cos"),
    "MLE, continued": ({"strategy": "mle"}, "MLE", "cos"),
    "MLE + consistency loss": ({"strategy": "consistency", "soft": "expected"}, "MLE", "cos"),
    "SCST (consistency reward)": ({"strategy": "scst"}, "MLE", "cos"),
    "SCST + MLE anchor (0.5)": ({"strategy": "scst", "scst_mle_weight": 0.5}, "MLE", "cos"),
    "SCST + fluency guard": ({"strategy": "scst"}, "MLE", "cos" + FLUENT),
}
REFEREE = (
    "attribute_precision",
    "attribute_recall",
    "attribute_f1",
    "relation_accuracy",
    "hallucinated_objects",
    "missed_objects",
    "correct",
)
LANGUAGE = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "distinct-1", "distinct-2", "repetition", "mean_length")


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


@dataclass
class Guides:
    """The guides of one backbone: every score it has, standardised on the validation pairs, their ensemble, and
    the ensemble guarded by the fluency head. :meth:`get` builds fresh scorers (empty caption caches), so each
    decoding is timed as a run of its own would be."""

    backbone: Any
    vocab: CaptionVocab
    modality: str
    stats: dict[str, tuple[float, float]]  # kind -> (mean, std) over the calibration pairs
    fluency: FluencyHead
    ensemble: Literal["mean", "min"] = "mean"

    @property
    def names(self) -> list[str]:
        return [*self.stats, ENSEMBLE, GUARDED]

    def raw(self, kind: str) -> CaptionConsistency:
        return CaptionConsistency(self.backbone, self.vocab, KINDS[kind], self.modality)

    def get(self, name: str) -> Scorer:
        if name.endswith(FLUENT):
            return Guarded(self.get(name[: -len(FLUENT)]), self.fluency, FLUENCY_WEIGHT)
        if name == ENSEMBLE:
            return Ensemble([Standardised(self.raw(k), *self.stats[k]) for k in self.stats], self.ensemble)
        return Standardised(self.raw(name), *self.stats[name])

    def reward(self, name: str) -> Scorer:
        """A training reward: the raw cosine, or with ``+ fluency`` the cosine plus the fluency term at the weight
        the guides give it (``std(cos) x FLUENCY_WEIGHT``, the same trade as z(cos) + fluency)."""
        if name == "cos" + FLUENT:
            return Guarded(self.raw("cos"), self.fluency, FLUENCY_WEIGHT * self.stats["cos"][1])
        return self.raw(name)


def make_guides(
    backbone: Any,
    vocab: CaptionVocab,
    modality: str,
    train_data: CaptionData,
    tune_data: CaptionData,
    seed: int,
    ensemble: Literal["mean", "min"] = "mean",
    progress: bool = True,
) -> tuple[Guides, dict[str, float]]:
    """Calibrate every score on the tuning split and train the fluency head on the training captions. Returns the
    guides and the head's accuracy per corruption type on the tuning split's captions."""
    kinds = ["cos"] + (["fused"] if backbone.has_fusion else []) + (["gen"] if backbone.has_generative else [])
    seqs, media = tune_data.targets[:, 1:], tune_data.features()
    stats = {}
    for kind in kinds:
        z = calibrate(CaptionConsistency(backbone, vocab, KINDS[kind], modality), seqs, media)
        stats[kind] = (z.mean, z.std)
    # word classes: a head reading words prefers seen combinations to held-out ones (bench/fluency_bias.py)
    classes = word_classes(vocab, Vocabulary.from_captions(train_data.captions))
    fluency = train_fluency(train_data.targets, len(vocab), progress=progress, cfg=None, classes=classes)
    accuracy = fluency_accuracy(fluency, tune_data.targets, len(vocab), seed=seed)
    return Guides(backbone, vocab, modality, stats, fluency, ensemble), accuracy


def decode_all(model: Decoder, data: CaptionData, cfg: DecodeConfig, guide: Scorer, batch: int = 64) -> list[str]:
    """Captions of every item under ``cfg`` (``guide``: what rerank / guided beam optimise; its vocabulary decodes)."""
    media = data.features()
    seqs = [
        generate(model, data.memory[i : i + batch], data.mask[i : i + batch], cfg, media[i : i + batch], guide).seqs
        for i in range(0, len(data), batch)
    ]
    return [c for s in seqs for c in guide.vocab.decode(s)]


def magic_all(
    lm: Captioner, media: MediaFeatures, guide: Scorer, alpha: float, beta: float, tau: float, batch: int = 64
) -> list[str]:
    """MAGIC captions of the image-blind ``lm`` for every medium (``beta`` = 0: its plain contrastive search)."""
    chunks = [media[i : i + batch] for i in range(0, len(media), batch)]
    seqs = [
        magic(lm, len(m), lm.cfg.max_len, guide, m, top_k=MAGIC_TOP_K, alpha=alpha, beta=beta, tau=tau).seqs
        for m in chunks
    ]
    return [c for s in seqs for c in guide.vocab.decode(s)]


@dataclass
class Candidates:
    """Every medium's ``CANDIDATES`` nucleus samples of a decoder: [N, K, T] sequences, [N, K] log-probabilities,
    and the seconds drawing them took."""

    seqs: torch.Tensor
    logp: torch.Tensor
    seconds: float

    @classmethod
    def draw(cls, model: Decoder, data: CaptionData, seed: int, batch: int = 64) -> Candidates:
        t, n = time.perf_counter(), CANDIDATES
        generator = torch.Generator().manual_seed(seed)
        seqs, logp = [], []
        for i in range(0, len(data), batch):
            memory, mask = data.memory[i : i + batch], data.mask[i : i + batch]
            drawn = sample(
                model,
                memory.repeat_interleave(n, 0),
                mask.repeat_interleave(n, 0),
                model.cfg.max_len,
                top_p=0.9,
                generator=generator,
            )
            seqs.append(drawn.seqs.view(len(memory), n, -1))
            logp.append(drawn.logp.view(len(memory), n))
        width = max(s.shape[-1] for s in seqs)
        seqs = [torch.nn.functional.pad(s, (0, width - s.shape[-1])) for s in seqs]  # PAD = 0
        return cls(torch.cat(seqs), torch.cat(logp), time.perf_counter() - t)

    def rerank(self, media: MediaFeatures, guide: Scorer, beta: float, batch: int = 64) -> list[str]:
        chosen = [
            rerank(self.seqs[i : i + batch], self.logp[i : i + batch], media[i : i + batch], guide, beta)[0].seqs
            for i in range(0, len(self.seqs), batch)
        ]
        return [c for s in chosen for c in guide.vocab.decode(s)]


@torch.no_grad()
@torch.no_grad()
def scores_of(guides: Guides, captions: list[str], media: MediaFeatures, chunk: int = 128) -> dict[str, np.ndarray]:
    """Per caption: every raw score (``cosine``, ``fused``, ``generative``) and every guide's value (``z:NAME``).
    Each raw score is computed once; the guides are derived from it as :meth:`Guides.get` builds them."""
    seqs = guides.vocab.encode([c or "" for c in captions], CaptionerConfig().max_len)[:, 1:]
    out: dict[str, torch.Tensor] = {}
    z = []
    for kind, (mean, std) in guides.stats.items():
        scorer = guides.raw(kind)
        raw = torch.cat(
            [scorer.score(seqs[i : i + chunk], media[i : i + chunk]).float() for i in range(0, len(seqs), chunk)]
        )
        out[KINDS[kind]] = raw
        out[f"z:{kind}"] = (raw - mean) / std
        z.append(out[f"z:{kind}"])
    stacked = torch.stack(z)
    out[f"z:{ENSEMBLE}"] = stacked.mean(0) if guides.ensemble == "mean" else stacked.min(0).values
    fluency = guides.fluency.score(seqs).to(stacked.device)
    out[f"z:{GUARDED}"] = out[f"z:{ENSEMBLE}"] + FLUENCY_WEIGHT * fluency
    return {k: v.cpu().numpy() for k, v in out.items()}


def truth(captions: list[str], items: list[dict[str, Any]]) -> float:
    """What tuning maximises: the referee's mean correctness when the items have scenes, else CIDEr against each
    item's own caption (lower-cased words; no Java tokenizer, so tuning stays cheap)."""
    if all("scene" in i for i in items):
        return referee(captions, [i["scene"] for i in items])["correct"]
    from pycocoevalcap.cider.cider import Cider

    def words(text: str) -> str:
        return " ".join(re.findall(r"[a-z0-9]+", text.lower())) or EMPTY

    refs = {k: [words(i["text"])] for k, i in enumerate(items)}
    return float(Cider().compute_score(refs, {k: [words(c)] for k, c in enumerate(captions)})[0])


def tune_setting(
    name: str, decode: Callable[[Any], list[str]], settings: tuple[Any, ...], tune_items: list[dict[str, Any]]
) -> tuple[Any, list[dict[str, Any]]]:
    """The setting of ``settings`` whose decoding of the tuning items (``decode(setting)``) scores the highest
    :func:`truth`; with the search (every setting and its figure). Only ``tune_items`` are ever judged here."""
    search = [{"setting": s, "truth": truth(decode(s), tune_items)} for s in settings]
    best = max(search, key=lambda r: r["truth"])  # the first of equals: the smallest weight
    print(f"  tuned {name}: {best['setting']} (" + ", ".join(f"{r['setting']}: {r['truth']:.3f}" for r in search) + ")")
    return best["setting"], search


def score_sensitivity(
    guides: Guides, items: list[dict[str, Any]], media: MediaFeatures, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What each guide sees: per change (one object's colour / shape / size, the relation inverted), the share of
    scenes whose true caption scores above the same phrasing of the changed scene (0.5: blind to it). A guide can
    only pass on what this shows (standardising a score keeps its order: ``cos`` is the cosine's figure)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for what in CHANGES:
        rows, true, changed = changed_captions([item["scene"] for item in items], what, rng)
        if not rows:
            continue
        sub = media[torch.tensor(rows)]
        a, b = scores_of(guides, true, sub), scores_of(guides, changed, sub)
        out[what] = {"scenes": len(rows), **{k[2:]: float((a[k] > b[k]).mean()) for k in a if k.startswith("z:")}}
    return out


def magic_setting(
    lm: Captioner, media: MediaFeatures, guides: Guides, guide: str, tau: float, setting: tuple[float, float]
) -> list[str]:
    return magic_all(lm, media, guides.get(guide), setting[0], setting[1], tau)


def rerank_setting(pool: Candidates, media: MediaFeatures, guides: Guides, guide: str, beta: float) -> list[str]:
    return pool.rerank(media, guides.get(guide), beta)


def guided_setting(model: Decoder, data: CaptionData, guides: Guides, guide: str, beta: float) -> list[str]:
    return decode_all(model, data, DecodeConfig("guided", beam=4, beta=beta), guides.get(guide))


def retrieved(media: torch.Tensor, caption_embeddings: torch.Tensor, captions: list[str]) -> list[str]:
    return retrieve_captions(media, caption_embeddings, captions)[0]


@dataclass
class Variant:
    """One (training, decoding) row: how to decode, the guide it optimises (``None``: none at decoding time), the
    row its gaming index is measured against, and the chosen setting."""

    decode: Callable[[], list[str]]
    guide: str | None
    base: tuple[str, str] | None
    setting: Any = None
    extra_seconds: float = 0.0  # shared work done once (the rerank candidates), added to its time


def run_backbone(
    backbone_dir: str | Path,
    label: str,
    train_items: list[dict[str, Any]],
    tune_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    modality: str,
    plan: WorldPlan,
    seed: int,
    ensemble: Literal["mean", "min"] = "mean",
    progress: bool = True,
) -> dict[str, Any]:
    """Every variant of one backbone and seed: guides, tuning on ``tune_items``, training and decoding, scoring
    on ``val_items``. Returns {"rows", "sensitivity", "spearman", "fluency", "tuning", "splits"}."""
    backbone: Any = load_backbone(str(backbone_dir)).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    vocab = CaptionVocab(backbone.tokenizer, [i["text"] for i in train_items])
    max_len = CaptionerConfig().max_len
    train_data, tune_data, val_data = (
        CaptionData.encode(backbone, vocab, items, modality, max_len) for items in (train_items, tune_items, val_items)
    )
    guides, fluency = make_guides(backbone, vocab, modality, train_data, tune_data, seed, ensemble, progress)
    names = guides.names
    cap_cfg = CaptionerConfig()
    tau = 0.01 / guides.stats["cos"][1]  # MAGIC's softmax temperature (0.01 on a raw cosine) on the z scale
    media, tune_media = val_data.features(), tune_data.features()
    tuning: dict[str, Any] = {}
    variants: dict[tuple[str, str], Variant] = {}

    # zero-shot: the image-blind language model (unguided / MAGIC, tuned) and CLIPRe
    torch.manual_seed(seed)
    lm = Captioner(cap_cfg, len(vocab), train_data.memory.shape[-1])
    train_captioner(lm, train_data.image_blind(), CaptionTrainConfig(epochs=plan.epochs, seed=seed), progress=progress)
    unguided = (ZERO_SHOT, "contrastive search (unguided)")
    variants[unguided] = Variant(
        partial(magic_all, lm, media, guides.get("cos"), MAGIC_GRID[0][0], 0.0, tau), None, unguided
    )
    for g in ("cos", ENSEMBLE, GUARDED):
        (alpha, beta), tuning[f"MAGIC {g}"] = tune_setting(
            f"MAGIC {g} (alpha, beta)",
            partial(magic_setting, lm, tune_media, guides, g, tau),
            MAGIC_GRID,
            tune_items,
        )
        variants[(ZERO_SHOT, f"MAGIC {g}")] = Variant(
            partial(magic_all, lm, media, guides.get(g), alpha, beta, tau), g, unguided, (alpha, beta)
        )
    distinct = sorted(set(train_data.captions))  # the retrieval index, built once (not in CLIPRe's time)
    caption_emb = backbone.encode_all("text", distinct).embedding.float()
    variants[("retrieval", "CLIPRe (cosine)")] = Variant(
        partial(retrieved, val_data.media, caption_emb, distinct), "cos", None
    )

    # the image-conditioned decoder under every training strategy
    mle_base = ("MLE", "greedy")
    models: dict[str, Captioner] = {}
    for name, (overrides, start, reward) in TRAININGS.items():
        torch.manual_seed(seed)
        model = copy.deepcopy(models[start]) if start else Captioner(cap_cfg, len(vocab), train_data.memory.shape[-1])
        cfg = CaptionTrainConfig(
            **overrides, epochs=plan.tune_epochs if start else plan.epochs, seed=seed, lr=2e-4 if start else 1e-3
        )
        train_captioner(model, train_data, cfg, guides.reward(reward), progress=progress)
        models[name] = model
        variants[(name, "greedy")] = Variant(
            partial(decode_all, model, val_data, DecodeConfig("greedy"), guides.get("cos")),
            "cos" if start and cfg.strategy != "mle" else None,
            mle_base,
        )
    mle = models["MLE"]
    variants[("MLE", "beam")] = Variant(
        partial(decode_all, mle, val_data, DecodeConfig("beam", beam=4), guides.get("cos")), None, mle_base
    )
    pool, tune_pool = Candidates.draw(mle, val_data, seed), Candidates.draw(mle, tune_data, seed)
    for g in names:
        beta, tuning[f"rerank {g}"] = tune_setting(
            f"rerank {g} beta", partial(rerank_setting, tune_pool, tune_media, guides, g), BETAS, tune_items
        )
        variants[("MLE", f"rerank {g}")] = Variant(
            partial(pool.rerank, media, guides.get(g), beta), g, mle_base, beta, pool.seconds
        )
    guided_beta: dict[str, float] = {}
    for g in ("cos", ENSEMBLE, GUARDED):
        guided_beta[g], tuning[f"guided {g}"] = tune_setting(
            f"guided {g} beta",
            partial(guided_setting, mle, tune_data, guides, g),
            GUIDED_BETAS,
            tune_items,
        )
        variants[("MLE", f"guided {g}")] = Variant(
            partial(decode_all, mle, val_data, DecodeConfig("guided", beam=4, beta=guided_beta[g]), guides.get(g)),
            g,
            mle_base,
            guided_beta[g],
        )
    if backbone.has_generative:  # the decoder trained with the towers (issue #27), as is and fine-tuned by MLE
        head = HeadCaptioner(backbone, vocab, modality, cap_cfg)
        tuned = copy.deepcopy(head)
        cfg = CaptionTrainConfig(strategy="mle", epochs=plan.tune_epochs, seed=seed, lr=2e-4)
        train_captioner(tuned, train_data, cfg, progress=progress)
        head_base = (HEAD, "greedy")
        variants[head_base] = Variant(
            partial(decode_all, head, val_data, DecodeConfig("greedy"), guides.get("cos")), None, head_base
        )
        beta = guided_beta[GUARDED]  # not re-tuned for the head: the MLE decoder's choice
        variants[(HEAD, f"guided {GUARDED}")] = Variant(
            partial(decode_all, head, val_data, DecodeConfig("guided", beam=4, beta=beta), guides.get(GUARDED)),
            GUARDED,
            head_base,
            beta,
        )
        variants[(f"{HEAD} + MLE", "greedy")] = Variant(
            partial(decode_all, tuned, val_data, DecodeConfig("greedy"), guides.get("cos")), None, head_base
        )

    captions: dict[tuple[str, str], list[str]] = {}
    seconds: dict[tuple[str, str], float] = {}
    for key, variant in tqdm(
        variants.items(), desc=f"decode ({label}, seed {seed})", unit="variant", disable=not progress
    ):
        t = time.perf_counter()
        captions[key] = variant.decode()
        seconds[key] = time.perf_counter() - t + variant.extra_seconds
    captions[("references", "-")] = val_data.captions
    seconds[("references", "-")] = float("nan")
    rows = score_variants(guides, captions, seconds, variants, val_data, val_items, label, seed)
    has_scenes = all("scene" in i for i in val_items)
    return {
        "rows": rows,
        "sensitivity": score_sensitivity(guides, val_items, media, seed) if has_scenes else {},
        "spearman": candidate_correlations(guides, pool, val_data, val_items) if has_scenes else {},
        "fluency": fluency,
        "calibration": {k: {"mean": m, "std": s} for k, (m, s) in guides.stats.items()},
        "tuning": tuning,
        "splits": {
            name: [i["key"] for i in items]
            for name, items in (("train", train_items), ("tune", tune_items), ("eval", val_items))
        },
    }


def candidate_correlations(
    guides: Guides, pool: Candidates, val_data: CaptionData, val_items: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per guide: the within-image Spearman correlation of its score with the referee's correctness over the MLE
    decoder's own candidates (mean over the images where both vary), and the number of such images."""
    n, k = pool.seqs.shape[:2]
    flat = guides.vocab.decode(pool.seqs.reshape(n * k, -1))
    media = val_data.features().repeat_interleave(k, 0)
    scores = scores_of(guides, flat, media)
    correct = np.array([judge(c, val_items[i // k]["scene"])["correct"] for i, c in enumerate(flat)]).reshape(n, k)
    out = {}
    for name in guides.names:
        rho, items = candidate_spearman(scores[f"z:{name}"].reshape(n, k), correct)
        out[name] = {"spearman": rho, "images": items}
    return out


def score_variants(
    guides: Guides,
    captions: dict[tuple[str, str], list[str]],
    seconds: dict[tuple[str, str], float],
    variants: dict[tuple[str, str], Variant],
    val_data: CaptionData,
    val_items: list[dict[str, Any]],
    label: str,
    seed: int,
) -> list[dict[str, Any]]:
    refs = references(val_items)
    quality = caption_metrics({f"{t}|{d}": c for (t, d), c in captions.items()}, refs)
    truths = [i["scene"] for i in val_items] if all("scene" in i for i in val_items) else None
    media = val_data.features()
    scores = {key: scores_of(guides, caps, media) for key, caps in captions.items()}
    correct = (
        {key: [judge(c, t)["correct"] for c, t in zip(caps, truths, strict=True)] for key, caps in captions.items()}
        if truths
        else {}
    )
    rows = []
    for (training, decoding), caps in captions.items():
        key = (training, decoding)
        row: dict[str, Any] = {
            "backbone": label,
            "training": training,
            "decoding": decoding,
            "seed": seed,
            **quality[f"{training}|{decoding}"],
            **{name: float(v.mean()) for name, v in scores[key].items()},
            "ms_per_caption": 1000 * seconds[key] / len(caps),
            "examples": caps[:6],
        }
        variant = variants.get(key)
        if variant is not None:
            row["guide"], row["setting"] = variant.guide, variant.setting
        if truths is not None:
            row.update(referee(caps, truths))
            if variant is not None and variant.base is not None and variant.base != key:
                optimised = f"z:{(variant.guide or 'cos').removesuffix(FLUENT)}"
                row["gaming_index"] = gaming_index(
                    scores[variant.base][optimised].tolist(),
                    scores[key][optimised].tolist(),
                    correct[variant.base],
                    correct[key],
                )
        rows.append(row)
    return rows


def split_tuning(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, tuning) items of one shard folder: the last tenth by sample id (at least 8) tunes, the rest
    trains."""
    ordered = sorted(items, key=lambda i: i["id"])
    n = max(8, len(ordered) // 10)
    if len(ordered) < n + 8:
        raise InputError(f"--data: {len(ordered)} samples are too few to keep {n} for tuning (pass --tune)")
    return ordered[:-n], ordered[-n:]


def load_items(option: str, shards: str | Path, modality: str) -> list[dict[str, Any]]:
    """:func:`read_items` of ``shards``, each with ``key``: ``FOLDER#ID`` (what the splits are told apart by)."""
    items = read_items(str(shards), modality)
    if not items:
        raise InputError(f"{option} {shards}: no samples with a caption and {modality} alone")
    for i in items:
        i["key"] = f"{shards}#{i['id']}"
    return items


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (over seeds; NaN figures left out) of every numeric figure, per (backbone, training, decoding),
    in first-seen order."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r.get("backbone", ""), r["training"], r["decoding"]), []).append(r)
    summary = []
    for (backbone, training, decoding), runs in out.items():
        entry: dict[str, Any] = {"backbone": backbone, "training": training, "decoding": decoding}
        for k in dict.fromkeys(k for r in runs for k in r):
            vals = [float(r[k]) for r in runs if isinstance(r.get(k), float | int) and not isinstance(r[k], bool)]
            vals = [v for v in vals if not math.isnan(v)]
            if k != "seed" and vals:
                entry[k] = float(np.mean(vals))
                entry[k + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        entry["seeds"] = len(runs)
        entry["setting"] = [r.get("setting") for r in runs]
        entry["examples"] = runs[0]["examples"]
        summary.append(entry)
    return summary


def mean_over_seeds(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{row: {column: value}} of several seeds -> the mean of each cell (NaN cells left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    for table_ in per_seed:
        for row, cells in table_.items():
            for col, v in cells.items():
                out.setdefault(row, {}).setdefault(col, []).append(v)
    return {
        row: {c: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan") for c, v in cells.items()}
        for row, cells in out.items()
    }


def _cell(r: dict[str, Any], k: str) -> str:
    v = r.get(k, float("nan"))
    if math.isnan(v):
        return "-"
    digits = 1 if k == "ms_per_caption" else 3
    return f"{v:.{digits}f} ± {r[k + '_std']:.{digits}f}" if r.get("seeds", 1) > 1 else f"{v:.{digits}f}"


NAMES = {
    "attribute_precision": "attr P",
    "attribute_recall": "attr R",
    "attribute_f1": "attr F1",
    "relation_accuracy": "relation acc",
    "hallucinated_objects": "halluc. obj",
    "missed_objects": "missed obj",
    "correct": "correct",
    "gaming_index": "gaming",
    "ms_per_caption": "ms/caption",
    "mean_length": "length",
    "z:ens": "z(ens)",
}


def table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = [
        "| training | decoding | " + " | ".join(NAMES.get(c, c) for c in columns) + " |",
        "|---" * (2 + len(columns)) + "|",
    ]
    for r in rows:
        lines.append(f"| {r['training']} | {r['decoding']} | " + " | ".join(_cell(r, c) for c in columns) + " |")
    return "\n".join(lines)


def grid(cells: dict[str, dict[str, float]], first: str) -> str:
    cols = list(dict.fromkeys(c for row in cells.values() for c in row))
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for row, values in cells.items():
        shown = [
            "-"
            if math.isnan(v := values.get(c, float("nan")))
            else (f"{v:.0f}" if c in ("scenes", "images") else f"{v:.3f}")
            for c in cols
        ]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def key_correct(row: dict[str, Any]) -> float:
    return row.get("correct", float("-inf"))


def findings(result: dict[str, Any]) -> str:
    """The issue's questions answered from the summary, per backbone: the best guided decoder's gains over the
    unguided greedy one, the gaming index of the guarded strategies and the score-referee correlation."""
    lines = []
    for backbone in result["backbones"]:
        rows = {(r["training"], r["decoding"]): r for r in result["summary"] if r["backbone"] == backbone}
        base = rows.get(("MLE", "greedy"))
        if base is None or "correct" not in base:
            continue
        guided = [r for (t, d), r in rows.items() if t == "MLE" and d.split()[0] in ("rerank", "guided")]
        best = max(guided, key=key_correct)
        gains = {
            k: best.get(k, float("nan")) - base.get(k, float("nan")) for k in ("relation_accuracy", "attribute_f1")
        }
        guarded = [r for r in rows.values() if "gaming_index" in r and FLUENT in r["decoding"] + r["training"]]
        spearman = result["spearman"].get(backbone, {})
        zero = {
            name: max((r for (t, d), r in rows.items() if t == training and d.startswith(prefix)), key=key_correct)
            for name, training, prefix in (
                ("MAGIC", ZERO_SHOT, "MAGIC"),
                ("CLIPRe", "retrieval", "CLIPRe"),
                ("image-blind", ZERO_SHOT, "contrastive"),
            )
            if any(t == training and d.startswith(prefix) for t, d in rows)
        }
        order = " > ".join(sorted(zero, key=lambda n: -zero[n]["correct"]))
        lines.append(
            f"- **{backbone}**: the best guided decoder on the referee's correctness is {best['decoding']} "
            f"({best['correct']:.3f} vs greedy {base['correct']:.3f}): relation accuracy "
            f"{gains['relation_accuracy']:+.3f}, attribute F1 {gains['attribute_f1']:+.3f} (targets +0.15, +0.10); "
            f"gaming index of the fluency-guarded strategies "
            + ", ".join(f"{r['training']} / {r['decoding']} {r['gaming_index']:.2f}" for r in guarded)
            + " (target <= 0.1); Spearman of the guides with the referee on the MLE decoder's candidates: "
            + ", ".join(f"{g} {v['spearman']:.2f}" for g, v in spearman.items())
            + f" (target >= 0.5); zero-shot order on correctness: {order} (published: MAGIC > CLIPRe > image-blind)."
        )
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    first = (
        (*REFEREE, "cosine", "z:ens", "gaming_index", "ms_per_caption")
        if result["referee"]
        else (
            "cosine",
            "z:ens",
            "ms_per_caption",
        )
    )
    parts = [f"Mean ± std over seeds {result['seeds']} ({result['val_items']} evaluation items).\n"]
    if result["referee"]:
        parts.append(findings(result) + "\n")
    for backbone in result["backbones"]:
        rows = [r for r in result["summary"] if r["backbone"] == backbone]
        parts.append(f"### Backbone: {backbone}\n")
        parts.append("Referee, scores and trust:\n\n" + table(rows, first) + "\n")
        parts.append("Reference-based metrics:\n\n" + table(rows, LANGUAGE) + "\n")
        if result["sensitivity"].get(backbone):
            parts.append(
                "What each score sees: share of evaluation scenes whose true caption scores above the same phrasing "
                "with one thing changed (0.5 = blind):\n\n" + grid(result["sensitivity"][backbone], "change") + "\n"
            )
        if result["spearman"].get(backbone):
            parts.append(
                "Spearman of each guide with the referee's correctness over the MLE decoder's own "
                f"{CANDIDATES} candidates per image:\n\n" + grid(result["spearman"][backbone], "guide") + "\n"
            )
        if result["fluency"].get(backbone):
            parts.append(
                "Fluency head on the validation captions (share called real / called corrupted):\n\n"
                + grid({"accuracy": result["fluency"][backbone]}, "")
                + "\n"
            )
    return "\n".join(parts)


def _marker(decoding: str) -> str:
    for prefix, marker in (("rerank", "s"), ("guided", "^"), ("MAGIC", "P"), ("CLIPRe", "*"), ("contrastive", "X")):
        if decoding.startswith(prefix):
            return marker
    return "o"  # greedy, beam


def plot(result: dict[str, Any], path: Path) -> None:
    """Per backbone: the ensemble score (z) against the referee's correctness of every variant. A variant right of
    another but not above it gains score without gaining truth. Colour: training; marker: decoding."""
    plt = pyplot()
    y = "correct" if result["referee"] else "CIDEr"
    fig, axes = plt.subplots(1, len(result["backbones"]), figsize=(6 * len(result["backbones"]), 5), squeeze=False)
    colours = plt.get_cmap("tab10")
    groups = list(dict.fromkeys(r["training"] for r in result["summary"] if r["training"] != "references"))
    for ax, backbone in zip(axes[0], result["backbones"], strict=True):
        for r in result["summary"]:
            if r["backbone"] != backbone or y not in r:
                continue
            refs = r["training"] == "references"
            ax.errorbar(
                r["z:ens"],
                r[y],
                xerr=r["z:ens_std"],
                yerr=r[y + "_std"],
                fmt="D" if refs else _marker(r["decoding"]),
                color="black" if refs else colours(groups.index(r["training"]) % 10),
                ms=6,
                capsize=2,
                alpha=0.85,
            )
        ax.set_title(backbone, fontsize=9)
        ax.set_xlabel("ensemble guide z (the optimised score)")
        ax.set_ylabel(f"{y} (referee)" if result["referee"] else y)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours(i % 10), label=g) for i, g in enumerate(groups)]
    handles += [
        plt.Line2D([], [], marker=m, ls="", color="black", label=label)
        for m, label in (("s", "rerank"), ("^", "guided beam"), ("P", "MAGIC"), ("*", "CLIPRe"), ("D", "references"))
    ]
    axes[0][0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"{result['val_items']} evaluation items, mean ± std over seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(
    jobs: list[tuple[str, Callable[[int], Path], int]],
    train_items: list[dict[str, Any]],
    tune_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    modality: str,
    plan: WorldPlan,
    out: Path,
    ensemble: Literal["mean", "min"] = "mean",
    progress: bool = True,
) -> dict[str, Any]:
    """Every (backbone label, backbone of a seed, seed) of ``jobs``; each finished one is kept in
    ``out/runs/LABEL-seedS.json`` and reused. Returns the combined result."""
    keys = {name: {i["key"] for i in items} for name, items in (("tune", tune_items), ("eval", val_items))}
    if keys["tune"] & keys["eval"]:
        raise InputError(f"--tune and --val share {len(keys['tune'] & keys['eval'])} samples")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    done: list[tuple[str, int, dict[str, Any]]] = []
    for label, backbone_of, seed in jobs:
        saved = out / "runs" / f"{slug(label)}-seed{seed}.json"
        if saved.exists():
            part = json.loads(saved.read_text())
        else:
            print(f"{label}, seed {seed}", flush=True)
            part = run_backbone(
                backbone_of(seed), label, train_items, tune_items, val_items, modality, plan, seed, ensemble, progress
            )
            saved.write_text(json.dumps(part))
        done.append((label, seed, part))
    labels = list(dict.fromkeys(label for label, _, _ in done))
    rows = [r for _, _, part in done for r in part["rows"]]
    return {
        "rows": rows,
        "summary": summarise(rows),
        "backbones": labels,
        "sensitivity": {b: mean_over_seeds([p["sensitivity"] for lb, _, p in done if lb == b]) for b in labels},
        "spearman": {b: mean_over_seeds([p["spearman"] for lb, _, p in done if lb == b]) for b in labels},
        "fluency": {
            b: mean_over_seeds([{"x": p["fluency"]} for lb, _, p in done if lb == b]).get("x", {}) for b in labels
        },
        "tuning": {f"{lb} / seed {s}": p["tuning"] for lb, s, p in done},
        "calibration": {f"{lb} / seed {s}": p["calibration"] for lb, s, p in done},
        "splits": done[0][2]["splits"] if done else {},
        "modality": modality,
        "seeds": sorted({s for _, s, _ in done}),
        "train_items": len(train_items),
        "tune_items": len(tune_items),
        "val_items": len(val_items),
        "plan": plan.__dict__,
        "ensemble": ensemble,
        "referee": all("scene" in i for i in val_items),
    }


@command("accord experiment captioning")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="accord experiment captioning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbone", help="an exported accord backbone (default: train them on the captioning world)")
    p.add_argument("--data", help="training shards (with --backbone)")
    p.add_argument("--val", help="evaluation shards (with --backbone)")
    p.add_argument(
        "--tune", help="validation shards settings are chosen on (with --backbone; default: a tenth of --data)"
    )
    p.add_argument("--modality", default="image", choices=("image", "video", "audio"))
    p.add_argument("--out", default="bench_out/captioning")
    p.add_argument("--quick", action="store_true", help="a small world and few epochs (a smoke run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="backbone and decoder seeds")
    p.add_argument(
        "--backbones",
        nargs="+",
        default=list(BACKBONES),
        help=f"world backbone recipes (default: {'; '.join(BACKBONES)}; any of: {'; '.join(RECIPES)})",
    )
    p.add_argument("--world-seed", type=int, default=0, help="seeds the world's scenes")
    p.add_argument(
        "--ensemble", choices=("mean", "min"), default="mean", help="how the ensemble guide combines z-values"
    )
    p.add_argument("--port", type=int, default=29591)
    args = p.parse_args(argv)
    given = [o for o in ("backbone", "data", "val") if getattr(args, o)]
    if given and len(given) < 3:
        missing = ", ".join(f"--{o}" for o in ("backbone", "data", "val") if o not in given)
        raise InputError(f"{', '.join('--' + o for o in given)} needs {missing} too (or none of them: the world)")
    if args.tune and not given:
        raise InputError("--tune needs --backbone, --data and --val (the world has its own validation scenes)")
    unknown = [b for b in args.backbones if b not in RECIPES]
    if unknown:
        raise InputError(f"--backbones: unknown recipe {unknown[0]!r} (recipes: {'; '.join(RECIPES)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = PLANS["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if given:
        for option in ("backbone", "data", "val", "tune"):
            path = getattr(args, option)
            if path and "://" not in str(path) and not Path(path).exists():
                raise InputError(f"--{option} {path}: no such folder")
        train_items = load_items("--data", args.data, args.modality)
        if args.tune:
            tune_items = load_items("--tune", args.tune, args.modality)
        else:
            train_items, tune_items = split_tuning(train_items)
        val_items = load_items("--val", args.val, args.modality)
        jobs = [(Path(args.backbone).name, lambda s: Path(args.backbone), seed) for seed in args.seeds]
    else:
        world = out / "world"
        train, heldout = build_world(world, plan, args.world_seed)
        val = validation_scenes(world, args.world_seed)
        train_items, val_items = load_items("--data", train, "image"), load_items("--val", heldout, "image")
        tune_items = load_items("validation scenes", val, "image")[: plan.tune_scenes]

        def backbone_of(name: str) -> Callable[[int], Path]:
            generative = any(o.startswith("model.generative=") for o in RECIPES[name])
            return lambda seed: train_backbone(
                world / "backbones" / slug(name) / f"seed{seed}",
                train,
                heldout,
                plan,
                seed,
                args.port,
                RECIPES[name],
                alpha_data=val if generative else None,
            )

        jobs = [(name, backbone_of(name), seed) for seed in args.seeds for name in args.backbones]
    result = run(jobs, train_items, tune_items, val_items, args.modality, plan, out, args.ensemble)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "accord experiment captioning " + " ".join(argv if argv is not None else [])
    (out / "captioning.json").write_text(json.dumps(result, indent=1))
    md = tables(result)
    (out / "captioning.md").write_text(md + "\n")
    plot(result, out / "captioning.png")
    print("\n" + md + f"\n\n{out / 'captioning.md'} ({result['seconds']:.0f} s)")
    return 0
