"""Typed one-edit negatives and the compositional evaluation: every negative type on hand-written captions, no
negative true of its scene, the per-category figures equal a hand count, blind baselines at 0.5 where a category is
balanced (and flagged where it is not), Winoground groups, the command."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.consistency import load_backbone
from accord.consistency.backbone import set_generative_info
from accord.data.negatives import Vocabulary, negatives
from accord.evaluation.blind import NgramLM, same_bag_of_words
from accord.evaluation.compositional import (
    ALPHAS,
    NULL_DECODER,
    choose_alpha,
    compositional_eval,
    preference,
    read_items,
)
from accord.evaluation.evaluate import main as main_eval
from accord.pipeline import build_shards
from accord.worlds import scenes
from accord.worlds.referee import parse

from helpers.backbones import random_backbone

CAPTIONS = [
    "a small red circle to the left of a large blue square",
    "a large blue square with a small red circle to its left",
    "a small green triangle, a large yellow square and a small purple circle",
    "there is one small red circle in the picture",
    "a green square moving left",
    "a blue circle moving up",
    "a high beeping tone",
    "a low steady tone",
]
VOCAB = Vocabulary.from_captions(CAPTIONS)


def test_each_negative_type_on_hand_written_captions() -> None:
    assert VOCAB.noun == ("circle", "square", "triangle") and VOCAB.size == ("small", "large")
    two = negatives(VOCAB, CAPTIONS[0], key="k")
    assert two["replace relation"] == "a small red circle to the right of a large blue square"
    assert two["swap arguments"] == "a large blue square to the left of a small red circle"
    assert two["swap binding"] in (
        "a small blue circle to the left of a large red square",
        "a large red circle to the left of a small blue square",
    )
    assert two["replace size"] in (
        "a large red circle to the left of a large blue square",
        "a small red circle to the left of a small blue square",
    )
    assert two["replace colour"].count("red") + two["replace colour"].count("blue") == 1
    assert {"add object", "drop object"}.isdisjoint(two)  # a relation caption: neither
    it = negatives(VOCAB, CAPTIONS[1], key="k")  # "B with A to its left": A left of B
    assert it["replace relation"] == "a large blue square with a small red circle to its right"
    assert it["swap arguments"] == "a small red circle with a large blue square to its left"
    three = negatives(VOCAB, CAPTIONS[2], key="k")
    assert three["drop object"] == "a small green triangle and a large yellow square"
    one = negatives(VOCAB, CAPTIONS[3], key="k")
    assert one["add object"].startswith("there is one small red circle and a ") and "replace relation" not in one
    assert negatives(VOCAB, CAPTIONS[4], key="k")["replace direction"] in (
        "a green square moving right",
        "a green square moving up",
        "a green square moving down",
    )
    tone = negatives(VOCAB, CAPTIONS[6], key="k")
    assert tone == {"replace pitch": "a low beeping tone", "replace rhythm": "a high steady tone"}
    assert negatives(VOCAB, CAPTIONS[0], key="k") == two  # seeded by the key
    assert negatives(VOCAB, "nothing to edit here", key="k") == {}


def test_no_negative_equals_its_caption_or_another_true_caption() -> None:
    same = "a small red circle above a small red circle"  # swapping identical objects changes nothing
    edits = negatives(VOCAB, same, key="k")
    assert "swap arguments" not in edits and "replace relation" not in edits  # "A below A" = "A above A"
    vocab = Vocabulary.from_captions([scenes.caption(s, t) for s, t in _every_caption()])
    for scene, template in _every_caption():
        text = scenes.caption(scene, template)
        truth = _canonical(parse(text).scene())
        assert truth == _canonical(scene)  # the world's referee reads its captions exactly
        for category, edited in negatives(vocab, text, key=text).items():
            assert edited != text, category
            parsed = parse(edited).scene()
            assert parsed is None or _canonical(parsed) != truth, (text, category, edited)
            if category.startswith("swap"):
                assert same_bag_of_words(text, edited)


def _every_caption() -> list[tuple[scenes.Scene, str]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(60):
        scene = scenes.random_scene(rng, heldout=bool(rng.integers(2)))
        out += [(scene, t) for t in scenes.TEMPLATES[len(scene.objects)]]
    return out


def _canonical(scene: scenes.Scene | None) -> tuple | None:
    """A scene's meaning: its objects as a multiset and the relation read in one direction."""
    if scene is None:
        return None
    relation = None
    if scene.relation is not None:
        a, b = scene.objects
        rel = scene.relation
        if rel in ("right of", "below"):
            a, b, rel = b, a, scenes.INVERSE[rel]
        relation = (a, rel, b)
    return tuple(sorted(scene.objects, key=str)), relation


def test_blind_baselines_sit_at_one_half_on_a_balanced_category_and_flag_a_biased_one() -> None:
    colours, shapes = ("red", "green", "blue"), ("circle", "square", "triangle")
    balanced = [f"a {c} {s}" for c, s in itertools.product(colours, shapes)]
    true = ["a red circle", "a blue square", "a green triangle"]
    edits = ["a green circle", "a red square", "a blue triangle"]
    for n in (1, 2):
        lm = NgramLM(balanced, n)
        logp = lambda texts, lm=lm: torch.tensor([lm.logp(t) for t in texts])  # noqa: E731
        assert float(preference(logp(true), logp(edits)).mean()) == 0.5  # every colour equally likely: ties
    swapped = ["a small blue circle left of a large red square"]
    original = ["a small red circle left of a large blue square"]
    bow = NgramLM(original + swapped, 1)
    assert bow.logp(original[0]) == bow.logp(swapped[0])  # a bag of words cannot tell a swap
    skewed = NgramLM(["a red circle"] * 10 + ["a blue square"] * 10, 2)
    assert skewed.logp("a red circle") > skewed.logp("a blue circle")  # the prior alone "solves" it: biased


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Captioning-world shards (train, held-out, minimal pairs) and a tiny random backbone."""
    root = tmp_path_factory.mktemp("world")
    scenes.write_world(root / "raw", train=40, heldout=24, seed=0, progress=False)
    scenes.write_minimal_pairs(root / "raw" / "pairs", pairs=6, seed=1)
    out = {}
    for split in ("train", "heldout", "pairs"):
        build_shards(root / "raw" / split, root / split, samples_per_shard=16, image_size=32)
        out[split] = root / split
    out["backbone"] = random_backbone("tiny.yaml", root / "backbone")
    return out


def test_per_category_figures_equal_a_hand_count(world: dict[str, Path]) -> None:
    result = compositional_eval(str(world["backbone"]), str(world["heldout"]), str(world["train"]))
    image = result["media"]["image"]
    assert result["samples"] == {"read": 24, "evaluated": 24, "skipped": {}}
    backbone = load_backbone(world["backbone"])
    from accord.shards.read import shard_items

    items = list(shard_items(str(world["heldout"]), with_json=True))
    train = [i["text"].strip() for i in shard_items(str(world["train"]))]
    vocab = Vocabulary.from_captions(train + [i["text"].strip() for i in items])
    with torch.no_grad():
        for category, got in image["categories"].items():
            wins, seen_wins, n_seen = [], [], 0
            for item in items:
                edit = negatives(vocab, item["text"].strip(), key=item["id"]).get(category)
                if edit is None:
                    continue
                medium = backbone.embed("image", [item["image"]])[0]
                cos_true = float(medium @ backbone.embed("text", [item["text"].strip()])[0])
                cos_edit = float(medium @ backbone.embed("text", [edit])[0])
                wins.append(1.0 if cos_true > cos_edit else 0.5 if cos_true == cos_edit else 0.0)
                if not json.loads(item["json"])["held_out"]:
                    n_seen += 1
                    seen_wins.append(wins[-1])
            assert got["n"] == len(wins), category
            assert got["scores"]["cosine"]["all"] == pytest.approx(sum(wins) / len(wins), abs=1e-6), category
            assert got["scores"]["cosine"]["unseen"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)  # held out
            assert got["scores"]["cosine"]["seen"] is None and n_seen == 0
            assert set(got["blind"]) == {"bag of words", "bigram"} and "text_probe_cos" in got
            if category.startswith("swap"):
                assert got["same_bag_of_words"] == 1.0 and got["blind"]["bag of words"] == 0.5
    assert {"replace colour", "replace shape", "replace size"} <= set(image["categories"])


GENERATIVE_HEAD = ["model.generative={dim: 16, layers: 1, heads: 2}"]


def test_generative_score_per_category_equals_a_hand_count(world: dict[str, Path], tmp_path: Path) -> None:
    """With a generative head: its score beside the cosine, by hand from ``caption_log_likelihood`` one sample at a
    time; the head's null-medium prior as a blind baseline; alpha chosen on other samples (the training scenes here)
    as the argmax of its search, and the score then subtracts alpha x the prior."""
    path = random_backbone("tiny.yaml", tmp_path / "generative", overrides=GENERATIVE_HEAD)
    backbone = load_backbone(path)
    from collections import Counter

    from accord.shards.read import shard_items

    chosen = choose_alpha(backbone, read_items(str(world["train"]), Counter()))
    assert set(chosen["search"]) == set(ALPHAS) and chosen["samples"] == 40
    assert chosen["search"][chosen["alpha"]] == max(chosen["search"].values())
    set_generative_info(path, {**chosen, "alpha": 0.5, "chosen_on": "a test"})
    result = compositional_eval(str(path), str(world["heldout"]), str(world["train"]))
    backbone = load_backbone(path)
    items = list(shard_items(str(world["heldout"]), with_json=True))
    train = [i["text"].strip() for i in shard_items(str(world["train"]))]
    vocab = Vocabulary.from_captions(train + [i["text"].strip() for i in items])
    with torch.no_grad():
        for category, got in result["media"]["image"]["categories"].items():
            wins, likely, blind = [], [], []
            for item in items:
                edit = negatives(vocab, item["text"].strip(), key=item["id"]).get(category)
                if edit is None:
                    continue
                medium = backbone.encode("image", [item["image"]])
                caps = [item["text"].strip(), edit]
                cond = backbone.caption_log_likelihood(caps, medium, "image")
                prior = backbone.caption_log_likelihood(caps, None, "image")
                wins.append(float(preference((cond - 0.5 * prior)[:1], (cond - 0.5 * prior)[1:])))
                likely.append(float(preference(cond[:1], cond[1:])))
                blind.append(float(preference(prior[:1], prior[1:])))
            assert got["scores"]["generative"]["all"] == pytest.approx(sum(wins) / len(wins), abs=1e-6), category
            assert got["scores"]["likelihood"]["all"] == pytest.approx(sum(likely) / len(likely), abs=1e-6)
            assert got["blind"][NULL_DECODER] == pytest.approx(sum(blind) / len(blind), abs=1e-6)


def test_winoground_groups_by_hand(world: dict[str, Path]) -> None:
    result = compositional_eval(str(world["backbone"]), str(world["pairs"]), str(world["train"]))
    groups = result["media"]["image"]["winoground"]
    assert groups["pairs"] == 6
    from accord.shards.read import shard_items

    backbone = load_backbone(world["backbone"])
    by_pair: dict[str, list[dict]] = {}
    for item in shard_items(str(world["pairs"]), with_json=True):
        by_pair.setdefault(json.loads(item["json"])["pair"], []).append(item)
    text = image = group = 0
    with torch.no_grad():
        for a, b in by_pair.values():
            ia, ib = backbone.embed("image", [a["image"], b["image"]])
            ta, tb = backbone.embed("text", [a["text"].strip(), b["text"].strip()])
            t_ok = bool(ia @ ta > ia @ tb) and bool(ib @ tb > ib @ ta)
            i_ok = bool(ia @ ta > ib @ ta) and bool(ib @ tb > ia @ tb)
            text, image, group = text + t_ok, image + i_ok, group + (t_ok and i_ok)
    assert groups["cosine"] == {"text": text / 6, "image": image / 6, "group": group / 6}


def test_the_command_writes_its_table_and_plot_and_refuses_bad_inputs(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--backbone", str(world["backbone"]), "--data", str(world["heldout"]), "--compositional"]
    assert main_eval([*argv, "--train-data", str(world["train"]), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["media"]["image"]["n"] == 24
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "compositional.json",
        "compositional.md",
        "compositional.png",
    }
    table = (tmp_path / "out" / "compositional.md").read_text()
    assert "| replace shape" in table and "blind: bigram" in table
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main_eval(["--backbone", str(world["backbone"]), "--data", str(empty), "--compositional"]) == 2
    assert "no sample with a caption and one medium" in capsys.readouterr().err


def test_the_experiment_summarises_seeds_as_mean_and_std(world: dict[str, Path]) -> None:
    from accord.experiments.compositional import markdown, summarise

    runs = [
        compositional_eval(str(world["backbone"]), str(world[split]), str(world["train"])) for split in ("heldout",)
    ]
    runs[0]["media"]["image"]["winoground"] = compositional_eval(
        str(world["backbone"]), str(world["pairs"]), str(world["train"])
    )["media"]["image"]["winoground"]
    table = summarise(runs + runs)  # two identical "seeds": the mean is the figure, the spread 0
    colour = runs[0]["media"]["image"]["categories"]["replace colour"]
    assert table["replace colour"]["cosine"] == (colour["scores"]["cosine"]["all"], 0.0)
    assert table["replace colour"]["blind: bigram"] == (colour["blind"]["bigram"], 0.0)
    assert table["Winoground-style group"]["cosine"][1] == 0.0
    md = markdown(table, [0, 1])
    assert "| replace colour |" in md and "+- 0.000" in md and "seeds [0, 1]" in md


def test_the_recipe_study_picks_its_winner_by_the_stated_criterion() -> None:
    """The highest target mean wins only within 0.01 of the frozen recipe's retrieval; the tables say so."""
    from accord.experiments.compositional import TARGETS, study_markdown, study_table, winner

    def result(level: float, r1: float) -> dict:
        cats = {
            c: {"scores": {"cosine": {"all": level}}, "blind": {"bag of words": 0.5}, "n": 10} for c in TARGETS[:-1]
        }
        return {
            "media": {"image": {"categories": cats, "winoground": {"cosine": {"group": level / 2}}}},
            "seen": {c: level + 0.1 for c in TARGETS[:-1]},
            "fresh": {c: level + 0.05 for c in TARGETS[:-1]},
            "retrieval R@1": r1,
            "train_s": 100.0,
            "relation probe": {"image": 0.25, "text": level},
            "arrangement probe": {"image": level / 2, "text": 0.3},
            "axis probe": {"image": 0.9, "text": 0.5},
        }

    by_recipe = {
        "frozen": [result(0.5, 0.30), result(0.52, 0.32)],
        "better": [result(0.7, 0.30), result(0.72, 0.31)],
        "best but forgets": [result(0.9, 0.28), result(0.9, 0.29)],  # R@1 0.285 < 0.31 - 0.01
    }
    table = study_table(by_recipe)
    assert table["better"]["retrieval R@1"][0] == pytest.approx(0.305)
    best, means = winner(table)
    assert best == "better" and "best but forgets" not in means
    assert means["better"] == pytest.approx((6 * 0.71 + 0.355) / 7)
    md = study_markdown(table, [0, 1])
    assert "Winner: **better**" in md and "| replace shape (trained) |" in md
    assert "| seen combinations, training scenes (cosine) | frozen | better | best but forgets |" in md
    assert "| seen combinations, fresh scenes (cosine) | frozen | better | best but forgets |" in md
    assert "| replace shape | 0.560 +- 0.014 | 0.760 +- 0.014 | 0.950 +- 0.000 |" in md  # fresh: level + 0.05
    assert "| relation probe: text embedding (chance 0.25) | 0.510 +- 0.014 | 0.710 +- 0.014 |" in md
    assert "| arrangement probe: image embedding (chance 0.25) | 0.255 +- 0.007 | 0.355 +- 0.007 |" in md
    assert "| axis probe: image embedding (chance 0.5) | 0.900 +- 0.000 | 0.900 +- 0.000 |" in md


def test_an_unknown_recipe_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from accord.experiments.compositional import main

    assert main(["--recipes", "frozen", "tuned twice", "--out", str(tmp_path)]) == 2
    assert "--recipes: unknown recipe 'tuned twice'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_every_recipe_is_a_valid_config_that_changes_it() -> None:
    """Each recipe's overrides load onto the shipped backbone config and validate (a misspelt key or value fails
    here, not an hour into a study), and no two recipes train the same config."""
    from accord.config import load_config, to_dict
    from accord.experiments.scene_world import RECIPES
    from accord.resources import config_file
    from accord.train.config import TrainConfig

    configs = {}
    for name, overrides in RECIPES.items():
        cfg = load_config(TrainConfig, config_file("captioning_world.yaml"), ["data.train=shards", *overrides])
        cfg.validate()
        configs[name] = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    assert len(set(configs.values())) == len(configs), "two recipes give the same config"


def test_a_larger_world_begins_with_the_smaller_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--train-scenes`` grows the world's training split: its first scenes are the default world's, byte for byte
    (pictures, counterfactuals, captions, scene json), so a larger world only adds scenes; too few exit 2."""
    from accord.experiments.compositional import main

    small, large = tmp_path / "small", tmp_path / "large"
    scenes.write_world(small, train=6, heldout=2, seed=3, progress=False, counterfactuals=True)
    scenes.write_world(large, train=10, heldout=2, seed=3, progress=False, counterfactuals=True)
    names = sorted(f.name for f in (small / "train").iterdir())
    assert len(names) >= 18  # png + txt + json per scene, and counterfactuals
    assert all((small / "train" / n).read_bytes() == (large / "train" / n).read_bytes() for n in names)
    assert len(list((large / "train").glob("s*[0-9].png"))) == 10
    assert main(["--train-scenes", "3", "--out", str(tmp_path / "out")]) == 2
    assert "--train-scenes: 3 is too few" in capsys.readouterr().err


def test_a_scenes_arrangement_is_the_same_whichever_object_its_caption_names_first() -> None:
    """The arrangement probe's label is a fact of the picture: a scene and the same picture captioned the other way
    round (objects swapped, relation inverted) get the same label; the relation as captioned differs."""
    circle, square = scenes.Obj("small", "red", "circle"), scenes.Obj("large", "blue", "square")
    for relation, label in (("left of", "right of"), ("right of", "left of"), ("above", "below"), ("below", "above")):
        scene = scenes.Scene((circle, square), relation)
        named_the_other_way = scenes.Scene((square, circle), scenes.INVERSE[relation])
        assert scenes.arrangement(scene) == scenes.arrangement(named_the_other_way) == label  # the square's place
    assert scenes.arrangement(scenes.Scene((circle, circle), "left of")) is None  # either could be first
    assert scenes.arrangement(scenes.Scene((circle,))) is None
    assert [scenes.axis(scenes.Scene((circle, square), r)) for r in scenes.RELATIONS] == ["left of"] * 2 + ["above"] * 2


def test_the_relation_probes_read_a_relation_where_an_embedding_holds_it(world: dict[str, Path], monkeypatch) -> None:
    """A stand-in backbone whose image embedding is the scene's arrangement (one-hot: what a picture can hold) and
    whose text embedding is noise: the arrangement probe reads it from the image side on held-out scenes and not
    from the text side, and the probe of the relation as captioned cannot read it from the image (the picture does
    not say which object the caption names first: held-out placements are training ones named the other way)."""
    from accord.experiments import compositional as experiment
    from accord.shards.read import shard_items

    placed = {}
    for split in ("train", "heldout"):
        for item in shard_items(str(world[split]), with_json=True):
            scene = scenes.Scene.from_json(json.loads(item["json"])["scene"])
            if scene.relation is not None:
                label = scenes.arrangement(scene)
                placed[item["image"]] = 4 if label is None else scenes.RELATIONS.index(label)
    assert set(placed.values()) >= {0, 1, 2, 3}

    class Stub:
        def embed(self, modality: str, inputs: list) -> torch.Tensor:
            if modality == "image":
                return torch.nn.functional.one_hot(torch.tensor([placed[x] for x in inputs]), 8).float()
            return torch.randn(len(inputs), 8, generator=torch.Generator().manual_seed(len(inputs)))

    monkeypatch.setattr(experiment, "load_backbone", lambda path: Stub())
    probe = experiment.relation_probes(Path("stub"), world["train"], world["heldout"])
    assert probe["arrangement probe"]["image"] == 1.0 and probe["arrangement probe"]["text"] < 0.75, probe
    assert probe["relation probe"]["image"] < 0.75, probe
    assert probe["axis probe"]["image"] == 1.0, probe  # the arrangement holds the axis
