"""Caption quality: BLEU-4, METEOR, ROUGE-L, CIDEr (pycocoevalcap; METEOR and the PTB tokenizer need Java), and
distinct-n / repetition / mean length, which expose degenerate captions that a consistency reward can drive a
decoder to."""

from __future__ import annotations

EMPTY = "unk"  # an empty caption is scored as this word (METEOR cannot take an empty string)


def distinct_n(captions: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set of captions."""
    grams = [tuple(words[i : i + n]) for c in captions for words in [c.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(captions: list[str], n: int = 4) -> float:
    """seq-rep-n (Welleck et al. 2020): per caption, the share of its word n-grams that repeat an earlier one of the
    same caption, averaged over captions (0: no caption repeats itself)."""
    rates = []
    for c in captions:
        words = c.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        rates.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / max(1, len(rates))


def mean_length(captions: list[str]) -> float:
    return sum(len(c.split()) for c in captions) / max(1, len(captions))


def coco_metrics(variants: dict[str, list[str]], references: list[list[str]]) -> dict[str, dict[str, float]]:
    """Corpus BLEU-4, METEOR, ROUGE-L and CIDEr of every variant's candidates against the same ``references``
    (one list per item). One PTB tokenizer run and one METEOR process serve all variants."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise RuntimeError("caption metrics need pycocoevalcap: pip install 'accord[experiments]'") from None
    for name, candidates in variants.items():
        if len(candidates) != len(references):
            raise ValueError(f"{name}: {len(candidates)} candidates for {len(references)} reference lists")
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    names = list(variants)
    flat = tok.tokenize(
        {f"{v}:{i}": [{"caption": c or EMPTY}] for v, name in enumerate(names) for i, c in enumerate(variants[name])}
    )
    meteor = Meteor()
    out = {}
    for v, name in enumerate(names):
        res = {i: [flat[f"{v}:{i}"][0].strip() or EMPTY] for i in range(len(references))}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out[name] = {
            "BLEU-4": float(bleu[3]),
            "METEOR": float(meteor.compute_score(gts, res)[0]),
            "ROUGE-L": float(Rouge().compute_score(gts, res)[0]),
            "CIDEr": float(Cider().compute_score(gts, res)[0]),
        }
    return out


def caption_metrics(variants: dict[str, list[str]], references: list[list[str]]) -> dict[str, dict[str, float]]:
    """:func:`coco_metrics` + distinct-1/2, seq-rep-4 and mean length, per variant."""
    coco = coco_metrics(variants, references)
    return {
        name: {
            **coco[name],
            "distinct-1": distinct_n(c, 1),
            "distinct-2": distinct_n(c, 2),
            "repetition": repetition(c),
            "mean_length": mean_length(c),
        }
        for name, c in variants.items()
    }
