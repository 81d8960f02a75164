"""Compositional evaluation: does a consistency score prefer a sample's caption over the same caption with one thing
made false (ARO, SugarCrepe, VL-CheckList)?

    accord eval --compositional --backbone backbone/ --data heldout_shards/ --train-data train_shards/ --out DIR

For every sample with a caption and one medium, :mod:`accord.data.negatives` writes one negative per category
(replace colour / shape / size / relation, swap arguments / binding, add / drop an object, replace a clip's
direction or a tone's pitch or rhythm). Reported per medium and category, for every score the backbone has
(``cosine``; ``fused`` with a fusion head; ``generative`` with a generative head, and ``likelihood``, its score
without the prior subtracted, when the backbone's alpha is not 0):

- the share of samples whose caption scores above its negative (ties count half; 0.5 = blind to the edit), over
  all samples and split into combinations seen and not seen in training (the sample json's ``held_out``: a list of
  held-out parts or a bool);
- **blind baselines** (:mod:`accord.evaluation.blind`): the same preference by text-only models trained on the
  training captions; a category where one beats 0.5 by more than 0.03 is flagged ``biased`` (the text alone solves
  it: the score's figure there measures language priors as much as the medium), one more than 0.03 below 0.5
  ``against_prior`` (the training text makes the edit likelier: combinations held out of training, or a shorter
  edit); with a generative head also that head decoding from its null medium (the caption prior its score
  subtracts); and the share of edits that keep the bag of words identical;
- a **text-tower probe**: mean and std of cos(text(caption), text(negative)) on the text tower's pooled features
  before the projection, so a user sees when the text side cannot tell the two apart;
- **Winoground-style groups** where two samples share a json ``pair`` id (two media, two captions that differ in
  one thing): text score (each medium prefers its caption), image score (each caption prefers its medium), group.

Samples without a usable caption or medium are counted by reason, never dropped silently.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accord.consistency.backbone import Backbone, HFClipBackbone, embed_in_chunks, load_backbone
from accord.data.negatives import CATEGORIES, Vocabulary, negatives
from accord.errors import InputError
from accord.evaluation.blind import NgramLM, blind_models, same_bag_of_words
from accord.evaluation.plots import pyplot
from accord.modalities import MEDIA
from accord.models.towers import TowerOutput
from accord.shards.read import sample_json, shard_items

BIAS = 0.03  # a blind model this far from 0.5 makes a category biased
NULL_DECODER = "generative head, null medium"  # the blind baseline of a backbone with a generative head


@dataclass
class Item:
    """One sample with a caption and exactly one medium."""

    key: str
    medium: str
    data: Any
    caption: str
    seen: bool | None  # the combination occurs in training; None when the json does not say
    pair: str | None  # Winoground-style minimal pair id


def read_items(data: str, skipped: Counter[str], limit: int | None = None) -> list[Item]:
    """The samples of ``data`` with a caption and one medium (the first ``limit`` of them); the others counted in
    ``skipped`` by reason."""
    items: list[Item] = []
    for raw in shard_items(data, with_json=True):
        if limit is not None and len(items) >= limit:
            break
        if raw.get("error"):
            skipped["unreadable"] += raw.get("lost", 1)
            continue
        media = [m for m in MEDIA if raw.get(m) is not None]
        caption = (raw.get("text") or "").strip()
        if not caption:
            skipped["no caption"] += 1
        elif len(media) != 1:
            skipped["no medium" if not media else "more than one medium"] += 1
        elif (meta := sample_json(raw)) is None:
            skipped["json not a JSON object"] += 1
        else:
            held = meta.get("held_out")
            seen = None if held is None else not bool(held)
            pair = meta.get("pair")
            items.append(Item(raw["id"], media[0], raw[media[0]], caption, seen, None if pair is None else str(pair)))
    return items


def preference(true: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """1 where the true caption scores higher, 0.5 on ties, 0 below."""
    return (true > edited).float() + 0.5 * (true == edited).float()


class PairScores:
    """The scores of (sample, caption) pairs of one medium: ``cosine``, and ``fused`` with a fusion head. Samples
    are given by their row among ``items``; every caption and sample is encoded once."""

    def __init__(
        self,
        backbone: Backbone | HFClipBackbone,
        items: list[Item],
        rows: list[int],
        captions: _Captions,
        chunk: int,
    ):
        self.backbone, self.captions, self.chunk = backbone, captions, chunk
        self.medium = items[rows[0]].medium
        self.local = {row: k for k, row in enumerate(rows)}
        data = [items[r].data for r in rows]
        with torch.no_grad():
            if isinstance(backbone, Backbone):
                self.media: TowerOutput | None = backbone.encode_all(self.medium, data, chunk)
                self.media_emb = self.media.embedding.float()
            else:
                self.media = None
                self.media_emb = embed_in_chunks(backbone, self.medium, data, chunk)
        fused = isinstance(backbone, Backbone) and backbone.has_fusion and captions.out is not None
        self.generative = isinstance(backbone, Backbone) and backbone.has_generative
        alpha = backbone.generative_alpha if isinstance(backbone, Backbone) and self.generative else 0.0
        self.names: tuple[str, ...] = ("cosine",) + (("fused",) if fused else ())
        if self.generative:  # the debiased score, and (alpha > 0) the plain likelihood beside it
            self.names += ("generative", "likelihood") if alpha else ("generative",)
        self.alpha = alpha
        self._prior: dict[str, float] = {}  # caption -> its mean token log-likelihood from the null medium

    def prior(self, captions: list[str]) -> torch.Tensor:
        """The generative head's caption prior (null medium) of each caption, each distinct one computed once."""
        assert isinstance(self.backbone, Backbone)
        todo = sorted(set(captions) - set(self._prior))
        with torch.no_grad():
            for s in range(0, len(todo), self.chunk):
                part = todo[s : s + self.chunk]
                values = self.backbone.caption_log_likelihood(part, None, self.medium)
                self._prior.update(zip(part, values.tolist(), strict=True))
        return torch.tensor([self._prior[c] for c in captions])

    def __call__(self, name: str, rows: list[int], captions: list[str]) -> torch.Tensor:
        t = torch.tensor([self.captions.index[c] for c in captions], dtype=torch.long)
        m = torch.tensor([self.local[r] for r in rows], dtype=torch.long)
        if name == "cosine":
            return (self.media_emb[m] * self.captions.emb[t]).sum(-1)
        if name in ("generative", "likelihood"):
            cond = self.conditional(m, captions)
            return cond - self.alpha * self.prior(captions) if name == "generative" and self.alpha else cond
        text, media, backbone = self.captions.out, self.media, self.backbone
        assert text is not None and media is not None and isinstance(backbone, Backbone)
        parts = []
        with torch.no_grad():
            for s in range(0, len(t), self.chunk):
                tt, mm = t[s : s + self.chunk], m[s : s + self.chunk]
                text_rows = TowerOutput(text.embedding[tt], text.tokens[tt], text.mask[tt])
                media_rows = TowerOutput(media.embedding[mm], media.tokens[mm].to(text.tokens.dtype), media.mask[mm])
                parts.append(torch.sigmoid(backbone.match_logits(text_rows, media_rows, self.medium).float()))
        return torch.cat(parts)

    def conditional(self, m: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The generative head's mean token log-likelihood of each caption given its medium (local rows ``m``)."""
        media, backbone = self.media, self.backbone
        assert media is not None and isinstance(backbone, Backbone)
        parts = []
        with torch.no_grad():
            for s in range(0, len(m), self.chunk):
                mm = m[s : s + self.chunk]
                rows = TowerOutput(media.embedding[mm], media.tokens[mm], media.mask[mm])
                parts.append(backbone.caption_log_likelihood(captions[s : s + self.chunk], rows, self.medium))
        return torch.cat(parts)


class _Captions:
    """Every distinct caption (true and edited) encoded once by the text tower: its embedding, and (accord
    backbones) its token features for the fused score and its pooled features before the projection for the probe."""

    def __init__(self, backbone: Backbone | HFClipBackbone, texts: list[str], chunk: int):
        self.index = {t: i for i, t in enumerate(texts)}
        with torch.no_grad():
            if isinstance(backbone, Backbone):
                self.out: TowerOutput | None = backbone.encode_all("text", texts, chunk)
                self.emb = self.out.embedding.float()
                self.pooled: torch.Tensor | None = torch.cat(
                    [backbone.pooled("text", texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
                )
            else:
                self.out, self.pooled = None, None
                self.emb = embed_in_chunks(backbone, "text", texts, chunk)


def _probe(captions: _Captions, true: list[str], edited: list[str]) -> list[float]:
    """cos(pooled(caption), pooled(negative)) before the projection (accord backbones only; else empty)."""
    if captions.pooled is None:
        return []
    a = captions.pooled[torch.tensor([captions.index[t] for t in true])]
    b = captions.pooled[torch.tensor([captions.index[e] for e in edited])]
    return F.cosine_similarity(a, b, dim=-1).tolist()


def _split(values: torch.Tensor, seen: list[bool | None]) -> dict[str, float | None]:
    def mean(mask: list[bool]) -> float | None:
        chosen = values[torch.tensor(mask, dtype=torch.bool)] if values.numel() else values
        return float(chosen.mean()) if chosen.numel() else None

    return {
        "all": mean([True] * len(seen)),
        "seen": mean([s is True for s in seen]),
        "unseen": mean([s is False for s in seen]),
    }


def compositional_eval(
    backbone_dir: str,
    data: str,
    train_data: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """The figures described in the module docstring for an exported backbone on a shard folder (``train_data``:
    the training shards, whose captions give the vocabulary and train the blind baselines; ``max_samples``: the
    first ones of ``data`` only)."""
    backbone = load_backbone(backbone_dir)
    skipped: Counter[str] = Counter()
    items = read_items(data, skipped, max_samples)
    train_captions = [i.caption for i in read_items(train_data, Counter())] if train_data else []
    if not items:
        raise InputError(f"{data}: no sample with a caption and one medium (skipped: {dict(skipped) or 'none'})")
    missing = sorted({i.medium for i in items} - set(backbone.modalities))
    if missing or "text" not in backbone.modalities:
        raise InputError(f"{backbone_dir}: no {' / '.join(missing or ['text'])} tower for the samples of {data}")
    result = evaluate_items(backbone, items, train_captions, skipped, batch_size)
    result["data"], result["train_data"] = data, train_data
    if train_data:
        result["blind_baselines"] = f"trained on {len(train_captions)} captions of {train_data}"
    return result


def evaluate_items(
    backbone: Backbone | HFClipBackbone,
    items: list[Item],
    train_captions: list[str],
    skipped: Counter[str] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The compositional figures of ``backbone`` on ``items`` (``skipped``: the reasons samples were left out so
    far, reported with the figures). The trainer's periodic evaluation calls this with its own model."""
    skipped = Counter(skipped or {})
    read = len(items) + sum(skipped.values())
    edits, texts = _edits(items, train_captions)
    if without := len(items) - len(edits):
        skipped["no negative of any category"] += without
    captions = _Captions(backbone, texts, batch_size)
    blind = blind_models(train_captions) if train_captions else {}
    result: dict[str, Any] = {"media": {}}
    for medium in MEDIA:
        rows = [i for i, it in enumerate(items) if it.medium == medium]
        if not rows:
            continue
        scores = PairScores(backbone, items, rows, captions, batch_size)
        per_category = {}
        for category in CATEGORIES:
            chosen = [r for r in rows if category in edits.get(items[r].key, {})]
            if chosen:
                per_category[category] = _category(items, chosen, edits, category, scores, captions, blind)
        result["media"][medium] = {
            "n": len(rows),
            "categories": per_category,
            "winoground": _groups(items, rows, scores),
        }
    result["samples"] = {"read": read, "evaluated": len(edits), "skipped": dict(skipped)}
    result["blind_baselines"] = f"trained on {len(train_captions)} captions" if blind else "none (no training captions)"
    return result


def _edits(items: list[Item], train_captions: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Each item's one-edit negatives by category (items without any left out), the vocabulary from
    ``train_captions`` and the items' captions; and every distinct caption, true or edited."""
    vocab = Vocabulary.from_captions(train_captions + [i.caption for i in items])
    edits = {i.key: found for i in items if (found := negatives(vocab, i.caption, key=i.key))}
    return edits, sorted({i.caption for i in items} | {n for e in edits.values() for n in e.values()})


ALPHAS = tuple(i / 10 for i in range(11))  # the generative score's prior weights tried by choose_alpha


def choose_alpha(backbone: Backbone, items: list[Item], batch_size: int = 64) -> dict[str, Any]:
    """The prior weight alpha in :data:`ALPHAS` of the generative score (likelihood given the medium minus alpha x
    the caption prior) under which the true captions of ``items`` (validation samples, never those evaluated) score
    above their one-edit negatives most often: the mean over categories (ties half), the lowest alpha on a tie.
    Returns ``{"alpha", "search": {alpha: mean}, "samples"}``."""
    edits, texts = _edits(items, [])
    captions = _Captions(backbone, texts, batch_size)
    wins: dict[float, dict[str, list[torch.Tensor]]] = {a: {} for a in ALPHAS}
    for medium in MEDIA:
        rows = [r for r, it in enumerate(items) if it.medium == medium and it.key in edits]
        if not rows:
            continue
        scores = PairScores(backbone, items, rows, captions, batch_size)
        for category in CATEGORIES:
            chosen = [r for r in rows if category in edits[items[r].key]]
            if not chosen:
                continue
            true = [items[r].caption for r in chosen]
            edited = [edits[items[r].key][category] for r in chosen]
            m = torch.tensor([scores.local[r] for r in chosen], dtype=torch.long)
            cond_t, cond_e = scores.conditional(m, true), scores.conditional(m, edited)
            prior_t, prior_e = scores.prior(true), scores.prior(edited)
            for a in ALPHAS:
                wins[a].setdefault(category, []).append(preference(cond_t - a * prior_t, cond_e - a * prior_e))
    if not any(wins[ALPHAS[0]].values()):
        raise InputError("no validation sample with a caption, one medium and a one-edit negative to choose alpha on")
    search = {a: statistics.fmean(float(torch.cat(v).mean()) for v in wins[a].values()) for a in ALPHAS}
    best = max(ALPHAS, key=lambda a: (round(search[a], 9), -a))
    return {"alpha": best, "search": search, "samples": len(edits)}


def _category(
    items: list[Item],
    chosen: list[int],
    edits: dict[str, dict[str, str]],
    category: str,
    scores: PairScores,
    captions: _Captions,
    blind: dict[str, NgramLM],
) -> dict[str, Any]:
    """One category's figures over the samples ``chosen`` (rows of ``items``)."""
    true = [items[r].caption for r in chosen]
    edited = [edits[items[r].key][category] for r in chosen]
    seen = [items[r].seen for r in chosen]
    entry: dict[str, Any] = {"n": len(chosen), "example": [true[0], edited[0]]}
    entry["scores"] = {
        name: _split(preference(scores(name, chosen, true), scores(name, chosen, edited)), seen)
        for name in scores.names
    }
    entry["blind"] = {
        name: float(preference(torch.tensor(list(map(lm.logp, true))), torch.tensor(list(map(lm.logp, edited)))).mean())
        for name, lm in blind.items()
    }
    if scores.generative:  # the same decoder without the medium: how much of its figure the caption prior gives
        entry["blind"][NULL_DECODER] = float(preference(scores.prior(true), scores.prior(edited)).mean())
    entry["biased"] = sorted(name for name, v in entry["blind"].items() if v > 0.5 + BIAS)
    entry["against_prior"] = sorted(name for name, v in entry["blind"].items() if v < 0.5 - BIAS)
    entry["same_bag_of_words"] = sum(map(same_bag_of_words, true, edited)) / len(true)
    probe = _probe(captions, true, edited)
    if probe:
        entry["text_probe_cos"] = {"mean": statistics.fmean(probe), "std": statistics.pstdev(probe)}
    return entry


def _groups(items: list[Item], rows: list[int], scores: PairScores) -> dict[str, Any]:
    """Winoground text / image / group scores over the minimal pairs among ``rows`` (two samples sharing a pair id)."""
    by_pair: dict[str, list[int]] = {}
    for r in rows:
        pair = items[r].pair
        if pair is not None:
            by_pair.setdefault(pair, []).append(r)
    pairs = [p for p in by_pair.values() if len(p) == 2 and items[p[0]].caption != items[p[1]].caption]
    if not pairs:
        return {"pairs": 0}
    out: dict[str, Any] = {"pairs": len(pairs)}
    for name in scores.names:
        r0 = [p[0] for p in pairs]
        r1 = [p[1] for p in pairs]
        c0 = [items[r].caption for r in r0]
        c1 = [items[r].caption for r in r1]
        s00, s01 = scores(name, r0, c0), scores(name, r0, c1)  # medium 0 with caption 0 / caption 1
        s11, s10 = scores(name, r1, c1), scores(name, r1, c0)
        text = (s00 > s01) & (s11 > s10)
        image = (s00 > s10) & (s11 > s01)
        out[name] = {
            "text": float(text.float().mean()),
            "image": float(image.float().mean()),
            "group": float((text & image).float().mean()),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    """One table per medium: the score's preference per category (all / seen / unseen), blind baselines, probe."""
    lines = []
    for medium, res in result["media"].items():
        names = sorted({n for c in res["categories"].values() for n in c["scores"]})
        blind = sorted({n for c in res["categories"].values() for n in c["blind"]})
        head = [
            "category",
            "n",
            *[f"{n} (all / seen / unseen)" for n in names],
            *[f"blind: {b}" for b in blind],
            "same bag of words",
            "text probe cos",
        ]
        lines += [f"### {medium} ({res['n']} samples)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for category, c in res["categories"].items():

            def fmt(v: float | None) -> str:
                return "-" if v is None else f"{v:.3f}"

            flag = " (biased)" if c["biased"] else " (prior favours the edit)" if c.get("against_prior") else ""
            cells = [category + flag, str(c["n"])]
            cells += [" / ".join(fmt(c["scores"][n][k]) for k in ("all", "seen", "unseen")) for n in names]
            cells += [fmt(c["blind"].get(b)) for b in blind]
            cells.append(f"{c['same_bag_of_words']:.2f}")
            probe = c.get("text_probe_cos")
            cells.append(f"{probe['mean']:.3f} +- {probe['std']:.3f}" if probe else "-")
            lines.append("| " + " | ".join(cells) + " |")
        wino = res["winoground"]
        if wino.get("pairs"):
            lines += [
                "",
                f"Winoground-style groups ({wino['pairs']} minimal pairs): "
                + "; ".join(
                    f"{n}: text {v['text']:.3f}, image {v['image']:.3f}, group {v['group']:.3f}"
                    for n, v in wino.items()
                    if n != "pairs"
                ),
            ]
        lines.append("")
    lines.append(
        f"Preference for the true caption over its edit (0.5 = blind). Blind baselines: "
        f"{result['blind_baselines']}; '(biased)': a blind model beats 0.5 by more than {BIAS} (the text alone "
        "solves it); '(prior favours the edit)': a blind model is more than that below 0.5 (the training text makes "
        "the edit likelier, as for combinations held out of training)."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars per category and medium: each score and each blind baseline; chance at 0.5."""
    plt = pyplot()
    media = list(result["media"].items())
    fig, axes = plt.subplots(len(media), 1, figsize=(11, 3.2 * len(media)), squeeze=False)
    for ax, (medium, res) in zip(axes[:, 0], media, strict=True):
        cats = list(res["categories"])
        series = [
            (n, [res["categories"][c]["scores"][n]["all"] for c in cats])
            for n in sorted({n for c in res["categories"].values() for n in c["scores"]})
        ]
        series += [
            (f"blind: {b}", [res["categories"][c]["blind"].get(b, float("nan")) for c in cats])
            for b in sorted({b for c in res["categories"].values() for b in c["blind"]})
        ]
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series):
            ax.bar([i + k * width for i in range(len(cats))], values, width, label=name)
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(cats))], [c.replace(" ", "\n", 1) for c in cats], fontsize=7
        )
        ax.set_ylim(0, 1)
        ax.set_ylabel("true caption preferred")
        ax.set_title(f"{medium}: caption vs its one-edit negative")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    """``out/compositional.json``, ``.md`` and ``.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compositional.json").write_text(json.dumps(result, indent=1))
    (out / "compositional.md").write_text(markdown(result))
    plot(result, out / "compositional.png")
