"""An independent referee for captions of the captioning world: parse a caption back into objects and a relation and
score it against the renderer's ground truth, so that a decoder that games the consistency score shows.

Parsing reads object mentions (``[size] colour shape``) left to right, and a relation phrase between two mentions
("... to the left of ...") or after the second ("... with a ... to its left"). On every caption the grammar of
:mod:`accord.worlds.scenes` writes, it returns the scene exactly (tested); on other text it keeps what it can
read (a mention without a size, a relation) and ignores the rest.

Per caption: attribute precision / recall (size, colour, shape of mentions matched one-to-one to true objects so
that the most attributes agree) and their F1, whether the stated relation holds, hallucinated objects (mentions
whose colour + shape no true object has), missed objects, and ``correct``: one figure of truth per caption (attribute
F1, averaged with the relation's correctness when the scene has a relation).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from accord.worlds.scenes import (
    COLOURS,
    INVERSE,
    RELATION_PHRASES,
    RELATION_PHRASES_IT,
    SHAPES,
    SIZES,
    Obj,
    Scene,
)

_MENTION = re.compile(rf"\b(?:({'|'.join(SIZES)})\s+)?({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b")


@dataclass(frozen=True)
class Mention:
    size: str | None
    colour: str
    shape: str


@dataclass(frozen=True)
class Parsed:
    mentions: tuple[Mention, ...]
    relation: tuple[int, str, int] | None  # (mention index, relation, mention index)

    def scene(self) -> Scene | None:
        """The parsed scene when every mention has a size (a caption of the grammar), else None."""
        sizes = [m.size for m in self.mentions]
        if not self.mentions or None in sizes:
            return None
        objs = [Obj(size or "", m.colour, m.shape) for size, m in zip(sizes, self.mentions, strict=True)]
        if self.relation is None:
            return Scene(tuple(objs))
        a, rel, b = self.relation
        return Scene((objs[a], objs[b]), rel)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())


def parse(caption: str) -> Parsed:
    text = _normalise(caption)
    found = list(_MENTION.finditer(text))
    mentions = tuple(Mention(m.group(1), m.group(2), m.group(3)) for m in found)
    relation = None
    if len(found) >= 2:
        between = re.sub(r"\s*\b(a|an|the)$", "", text[found[0].end() : found[1].start()].strip())
        after = text[found[1].end() :].strip()
        for rel, phrase in RELATION_PHRASES.items():
            if between == phrase or between.endswith(" " + phrase):
                relation = (0, rel, 1)
        for rel, phrase in RELATION_PHRASES_IT.items():
            if relation is None and (after == phrase or after.startswith(phrase + " ")):
                relation = (1, rel, 0)  # "a B with a A to its left": A is left of B
    return Parsed(mentions, relation)


def _agree(m: Mention, o: Obj) -> int:
    return (m.size == o.size) + (m.colour == o.colour) + (m.shape == o.shape)


def judge(caption: str, truth: Scene) -> dict[str, float]:
    """The referee's figures for one caption (precision is 1 for a caption that states nothing)."""
    parsed = parse(caption)
    mentions, objs = parsed.mentions, truth.objects
    best = -1
    match: tuple[int, ...] = ()
    for perm in itertools.permutations(range(len(objs)), min(len(mentions), len(objs))):
        agree = sum(_agree(mentions[i], objs[j]) for i, j in enumerate(perm))
        if agree > best:
            best, match = agree, perm
    stated = sum(2 + (m.size is not None) for m in mentions)  # colour, shape and maybe size
    kinds = {(o.colour, o.shape) for o in objs}
    out = {
        "attribute_precision": max(best, 0) / stated if stated else 1.0,
        "attribute_recall": max(best, 0) / (3 * len(objs)),
        "hallucinated_objects": float(sum((m.colour, m.shape) not in kinds for m in mentions)),
        "missed_objects": float(max(0, len(objs) - len(mentions))),
        "parsed": float(parsed.scene() is not None),
    }
    p, r = out["attribute_precision"], out["attribute_recall"]
    out["attribute_f1"] = 2 * p * r / (p + r) if p + r else 0.0
    if parsed.relation is not None:
        a, rel, b = parsed.relation
        holds = False
        if truth.relation is not None and a < len(match) and b < len(match):
            pair = (match[a], match[b])
            holds = (pair == (0, 1) and rel == truth.relation) or (pair == (1, 0) and rel == INVERSE[truth.relation])
        out["relation_correct"] = float(holds)
    # one figure of truth per caption: attribute F1, averaged with the relation's correctness when the scene has one
    # (a caption that states no relation of a two-object scene gets 0 for it)
    if truth.relation is None:
        out["correct"] = out["attribute_f1"]
    else:
        out["correct"] = (out["attribute_f1"] + out.get("relation_correct", 0.0)) / 2
    return out


def referee(captions: list[str], truths: list[Scene]) -> dict[str, float]:
    """Means over captions; relation accuracy over the captions that state a relation (with their count)."""
    rows = [judge(c, t) for c, t in zip(captions, truths, strict=True)]
    out = {
        k: sum(r[k] for r in rows) / len(rows)
        for k in (
            "attribute_precision",
            "attribute_recall",
            "attribute_f1",
            "hallucinated_objects",
            "missed_objects",
            "parsed",
            "correct",
        )
    }
    stated = [r["relation_correct"] for r in rows if "relation_correct" in r]
    out["relation_accuracy"] = sum(stated) / len(stated) if stated else float("nan")
    out["relations_stated"] = float(len(stated))
    return out
