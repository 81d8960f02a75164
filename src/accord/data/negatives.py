"""Typed one-edit negatives of a caption (NegCLIP, SugarCrepe): the same sentence with one thing made false.

    vocab = Vocabulary.from_captions(training_captions)
    negatives(vocab, "a small red circle to the left of a large blue square", key="000000042")
    -> {"replace colour": "a small green circle to the left of ...", "swap arguments": "a large blue square to the
        left of a small red circle", "replace relation": "... to the right of ...", ...}

A caption is read as **mentions** ``[size] [colour] noun`` (the words of each class that occur in the data; nouns are
the data's words that follow a colour or size), an optional **relation** between two mentions ("A to the left of
B", or "B with A to its left"), and other typed words (a clip's motion after "moving", a tone's pitch and rhythm).
Every edit works on the caption's own text spans, so a negative keeps the phrasing of its positive.

An edit is a negative only when its **meaning** differs from the caption's: the objects (as a multiset), the
relation in a canonical direction ("B right of A" is "A left of B"), and the other typed words. So an edit that gives
the same sentence, or another true description of the same scene (arguments swapped *and* the relation inverted),
is never a negative. One negative per category is drawn per caption, seeded by the sample key.

Categories: replace colour / shape / size / relation, swap arguments, swap binding (exchange a colour or a size
between two objects), add object, drop object (the last of a list), replace direction (video), replace pitch and
replace rhythm (audio).
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# Words by class: what an edit may put in place of another word of the same class (only those the data uses).
ATTRIBUTE_WORDS = {
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey"),
    "size": ("small", "large", "big", "little", "tiny", "huge"),
}
TYPED_WORDS = {  # (class, the word before it or None, words): a typed word outside the mentions
    "direction": ("moving", ("left", "right", "up", "down")),
    "pitch": (None, ("low", "middle", "high")),
    "rhythm": (None, ("steady", "beeping", "rising", "falling")),
}
# relation phrase between two mentions -> relation; after the second ("a B with a A to its left": A left of B)
RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
RELATIONS_AFTER = {"to its left": "left of", "to its right": "right of", "above it": "above", "below it": "below"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
STOP = frozenset({"a", "an", "the", "and", "with", "of", "on", "in", "to", "is", "one", "two", "three"})
CATEGORIES = (
    "replace colour",
    "replace shape",
    "replace size",
    "replace relation",
    "swap arguments",
    "swap binding",
    "add object",
    "drop object",
    "replace direction",
    "replace pitch",
    "replace rhythm",
)


@dataclass(frozen=True)
class Vocabulary:
    """The words of each class that the data's captions use; nouns are words that follow a colour or a size."""

    colour: tuple[str, ...]
    size: tuple[str, ...]
    noun: tuple[str, ...]
    direction: tuple[str, ...]
    pitch: tuple[str, ...]
    rhythm: tuple[str, ...]

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> Vocabulary:
        seen: Counter[str] = Counter()
        nouns: Counter[str] = Counter()
        attributes = {w for words in ATTRIBUTE_WORDS.values() for w in words}
        typed = {w for _, words in TYPED_WORDS.values() for w in words}
        for caption in captions:
            words = _words(caption)
            seen.update(words)
            for prev, word in zip(words, words[1:], strict=False):
                if prev in attributes and word not in attributes and word not in typed and word not in STOP:
                    nouns[word] += 1
        pick = lambda options: tuple(w for w in options if seen[w])  # noqa: E731
        return cls(
            colour=pick(ATTRIBUTE_WORDS["colour"]),
            size=pick(ATTRIBUTE_WORDS["size"]),
            noun=tuple(sorted(nouns)),
            direction=pick(TYPED_WORDS["direction"][1]),
            pitch=pick(TYPED_WORDS["pitch"][1]),
            rhythm=pick(TYPED_WORDS["rhythm"][1]),
        )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


@dataclass(frozen=True)
class Mention:
    """An object named in a caption: the spans (start, end) of its words in the caption text."""

    span: tuple[int, int]
    size: tuple[int, int] | None
    colour: tuple[int, int] | None
    noun: tuple[int, int]


@dataclass(frozen=True)
class Reading:
    """What a caption says, as far as the vocabulary reads it."""

    text: str
    mentions: tuple[Mention, ...]
    relation: tuple[int, str, int, tuple[int, int], bool] | None  # (subject, relation, object, phrase span, after)
    typed: tuple[tuple[str, tuple[int, int]], ...]  # (class, span) of direction / pitch / rhythm words

    def word(self, span: tuple[int, int] | None) -> str | None:
        return None if span is None else self.text[span[0] : span[1]].lower()

    def meaning(self) -> tuple:
        """Objects (multiset), the relation in its canonical direction, and the typed words: equal meanings are
        equally true of any scene."""
        objects = [(self.word(m.size), self.word(m.colour), self.word(m.noun)) for m in self.mentions]
        relation = None
        if self.relation is not None:
            s, rel, o = self.relation[:3]
            subject, obj = objects[s], objects[o]
            if rel in ("right of", "below"):
                subject, obj, rel = obj, subject, INVERSE[rel]
            relation = (subject, rel, obj)
        typed = tuple((cls, self.word(span)) for cls, span in self.typed)
        return tuple(sorted(objects, key=str)), relation, typed

    def facts(self) -> set[tuple]:
        """The combinations the caption asserts: each object (size, colour, noun), the relation between two, the
        typed words together. An edit recombines words; these are what a recombination can make new."""
        objects, relation, typed = self.meaning()
        return (
            {("object", o) for o in objects}
            | ({("relation", relation)} if relation else set())
            | ({("typed", typed)} if typed else set())
        )


def seen_facts(captions: Iterable[str], vocab: Vocabulary) -> frozenset[tuple]:
    """Every combination (:meth:`Reading.facts`) that some caption asserts."""
    return frozenset(f for c in captions for f in read(c, vocab).facts())


def read(caption: str, vocab: Vocabulary) -> Reading:
    """The mentions, relation and typed words of ``caption``."""
    text = caption
    mentions = []
    if vocab.noun:
        size = "|".join(map(re.escape, vocab.size)) or "(?!)"
        colour = "|".join(map(re.escape, vocab.colour)) or "(?!)"
        noun = "|".join(map(re.escape, sorted(vocab.noun, key=len, reverse=True)))
        pattern = re.compile(rf"\b(?:({size})\s+)?(?:({colour})\s+)?({noun})\b", re.IGNORECASE)
        for m in pattern.finditer(text):
            if m.group(1) is None and m.group(2) is None:
                continue  # a bare noun is not a mention: "shapes" in "three shapes:"
            mentions.append(
                Mention(
                    m.span(),
                    m.span(1) if m.group(1) else None,
                    m.span(2) if m.group(2) else None,
                    m.span(3),
                )
            )
    relation = None
    if len(mentions) == 2:
        a, b = mentions
        between = text[a.span[1] : b.span[0]].lower()
        after = text[b.span[1] :].lower()
        for phrase, rel in RELATIONS.items():
            found = re.search(rf"\b{re.escape(phrase)}\b", between)
            if found:
                start = a.span[1] + found.start()
                relation = (0, rel, 1, (start, start + len(phrase)), False)
        for phrase, rel in RELATIONS_AFTER.items():
            found = re.match(rf"\s*{re.escape(phrase)}\b", after)
            if relation is None and found:
                start = b.span[1] + found.start() + len(found.group(0)) - len(phrase)
                relation = (1, rel, 0, (start, start + len(phrase)), True)
    typed = []
    for cls, (before, _) in TYPED_WORDS.items():
        words = getattr(vocab, cls)
        if not words:
            continue
        prefix = rf"\b{before}\s+" if before else r"\b"
        for m in re.finditer(rf"{prefix}({'|'.join(words)})\b", text, re.IGNORECASE):
            typed.append((cls, m.span(1)))
    return Reading(text, tuple(mentions), relation, tuple(sorted(typed, key=lambda t: t[1])))


def _replace(text: str, edits: list[tuple[tuple[int, int], str]]) -> str:
    """``text`` with each span replaced (spans do not overlap)."""
    for (start, end), new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _candidates(r: Reading, vocab: Vocabulary) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    text = r.text
    for m in r.mentions:
        for cls, span in (("colour", m.colour), ("size", m.size), ("shape", m.noun)):
            if span is None:
                continue
            current = r.word(span)
            options = vocab.noun if cls == "shape" else getattr(vocab, cls)
            out[f"replace {cls}"] += [_replace(text, [(span, w)]) for w in options if w != current]
    if r.relation is not None:
        s, rel, o, span, after = r.relation
        phrases = {v: k for k, v in (RELATIONS_AFTER if after else RELATIONS).items()}
        out["replace relation"].append(_replace(text, [(span, phrases[INVERSE[rel]])]))
        a, b = r.mentions
        out["swap arguments"].append(_replace(text, [(a.span, text[slice(*b.span)]), (b.span, text[slice(*a.span)])]))
    for i, a in enumerate(r.mentions):
        for b in r.mentions[i + 1 :]:
            for attr in ("colour", "size"):
                sa, sb = getattr(a, attr), getattr(b, attr)
                if sa is not None and sb is not None and r.word(sa) != r.word(sb):
                    out["swap binding"].append(_replace(text, [(sa, text[slice(*sb)]), (sb, text[slice(*sa)])]))
    if len(r.mentions) == 1 and r.relation is None:
        m = r.mentions[0]
        for size in vocab.size or (None,):
            for colour in vocab.colour or (None,):
                for noun in vocab.noun:
                    words = " ".join(w for w in (size, colour, noun) if w)
                    if (size, colour, noun) != (r.word(m.size), r.word(m.colour), r.word(m.noun)):
                        out["add object"].append(_replace(text, [((m.span[1], m.span[1]), f" and a {words}")]))
    if len(r.mentions) >= 2 and r.relation is None:
        last, prev = r.mentions[-1], r.mentions[-2]
        joint = text[prev.span[1] : last.span[0]]
        if re.fullmatch(r"\s+and\s+(?:an?\s+)?", joint):  # "..., B and C" -> "... and B"; "A and B" -> "A"
            dropped = text[: prev.span[1]] + text[last.span[1] :]
            if len(r.mentions) >= 3:
                comma = text[r.mentions[-3].span[1] : prev.span[0]]
                if re.fullmatch(r",\s+(?:an?\s+)?", comma):
                    start = r.mentions[-3].span[1]
                    article = re.search(r"an?\s+$", comma)
                    dropped = (
                        dropped[:start] + " and " + (article.group(0) if article else "") + dropped[prev.span[0] :]
                    )
            out["drop object"].append(dropped)
    for cls, span in r.typed:
        current = r.word(span)
        out[f"replace {cls}"] += [_replace(text, [(span, w)]) for w in getattr(vocab, cls) if w != current]
    return out


def _is_negative(candidate: str, truth: tuple, norm: str, vocab: Vocabulary, seen: frozenset[tuple] | None) -> bool:
    """Another sentence with another meaning (and, with ``seen``, no combination outside it)."""
    if " ".join(candidate.lower().split()) == norm:
        return False
    r = read(candidate, vocab)
    return r.meaning() != truth and (seen is None or r.facts() <= seen)


def negatives(vocab: Vocabulary, caption: str, key: str = "", seen: frozenset[tuple] | None = None) -> dict[str, str]:
    """One negative per category that the caption allows: ``{category: edited caption}``, drawn among the valid
    edits with a generator seeded by ``key`` and the category; with ``seen`` (:func:`seen_facts`), only edits that
    assert no combination outside it."""
    reading = read(caption, vocab)
    truth, norm = reading.meaning(), " ".join(caption.lower().split())
    out = {}
    for category, options in _candidates(reading, vocab).items():
        valid = sorted(c for c in set(options) if _is_negative(c, truth, norm, vocab, seen))
        if valid:
            rng = random.Random(zlib.crc32(f"{key}/{category}".encode()))
            out[category] = valid[rng.randrange(len(valid))]
    return out


@dataclass(frozen=True)
class NegativeSampler:
    """Draws a caption's hard negatives for training: up to ``per_caption`` edits, each of another category of
    ``types``, the categories and edits chosen by ``rng`` (the loader's per-sample generator: another draw each
    epoch, the same on a resume)."""

    vocab: Vocabulary
    types: tuple[str, ...]
    per_caption: int
    seen: frozenset[tuple] | None = None  # only edits within these combinations (:func:`seen_facts`)

    def __call__(self, caption: str, rng: random.Random) -> list[str]:
        """Categories in a random order, in each the candidates in a random order, the first valid one taken: the
        same distribution as :func:`negatives` (uniform over the valid edits) at the cost of the candidates read
        until a valid one, not of all of them (a large noun vocabulary)."""
        reading = read(caption, self.vocab)
        truth, norm = reading.meaning(), " ".join(caption.lower().split())
        candidates = _candidates(reading, self.vocab)
        out: list[str] = []
        for category in rng.sample(self.types, len(self.types)):
            options = sorted(set(candidates.get(category, ())))
            rng.shuffle(options)
            found = next((c for c in options if _is_negative(c, truth, norm, self.vocab, self.seen)), None)
            if found is not None:
                out.append(found)
                if len(out) == self.per_caption:
                    break
        return out
