"""Contrastive losses: exact gradients at world size 2 (real gloo processes) vs one process on the whole batch."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from accord.losses import ContrastiveLoss, LossConfig
from accord.losses.contrastive import HardNegativesConfig
from accord.models.model import ModelOutput

from helpers.procs import ENV, WORKERS, torchrun
from helpers.tiny import VARIANTS, rel_err, rows_in_rank_order, run, tiny_model, variant_batch


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    proc = subprocess.run(
        torchrun(WORKERS / "loss_worker.py", str(out)), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_two_ranks_equal_one_process(two_rank_results: dict, variant: tuple) -> None:
    dist_res = two_rank_results[variant]
    model = tiny_model(init_logit_bias=-10.0)
    ref = run(model, variant, variant_batch(variant))
    assert rel_err(dist_res["loss"], ref["loss"]) < 1e-5
    for m, g in ref["features"].items():  # with pairs, each rank's rows are its samples and then their pairs
        assert rel_err(dist_res["features"][m], rows_in_rank_order(g, 2) if variant[5] else g) < 1e-5, m
    checked = 0
    for name, g in ref["params"].items():
        assert rel_err(dist_res["params"][name], g) < 1e-5, name
        checked += int(g.abs().sum() > 0)
    # Towers, projections and temperatures all received real (non-zero) gradients.
    assert checked > 0.8 * len(ref["params"]) - 8
    if variant[4] is not None:  # the negatives are columns that matter, and their embeddings take gradient
        grad = ref["features"]["text_negatives"]
        assert grad[:8][variant_batch(variant)["text_negatives"]["present"]].abs().sum(dim=-1).min() > 0
        plain = run(model, (*variant[:4], None, variant[5]), variant_batch(variant))
        assert abs(plain["loss"].item() - ref["loss"].item()) > 1e-3
    if variant[5]:  # the pairs are rows that matter: each present pair's image and caption take gradient
        pairs = variant_batch(variant)["counterfactual"]["present"]
        for m in ("text", "image"):
            assert ref["features"][m][8:][pairs[m]].abs().sum(dim=-1).min() > 0, m
            assert ref["features"][m][8:][~pairs[m]].abs().sum() == 0, m
        without = run(model, (*variant[:5], False), variant_batch((*variant[:5], False)))
        assert abs(without["loss"].item() - ref["loss"].item()) > 1e-3
    kind = variant[0]
    for pair in ("text-image", "text-video", "text-audio"):
        assert ref["params"][f"logit_scale.{pair}"].abs().sum() > 0
        if kind == "siglip":
            assert ref["params"][f"logit_bias.{pair}"].abs().sum() > 0


def _output(a: torch.Tensor, b: torch.Tensor, present_b: torch.Tensor, scale: float = 10.0) -> ModelOutput:
    n = len(a)
    return ModelOutput(
        embeddings={"text": a, "image": b},
        present={"text": torch.ones(n, dtype=torch.bool), "image": present_b},
        logit_scale={"text-image": torch.tensor([scale], dtype=a.dtype)},
        logit_bias={"text-image": torch.tensor([-10.0], dtype=a.dtype)},
        pairs=[("text", "image")],
    )


def test_infonce_matches_clip_formula_and_open_clip_convention() -> None:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    loss, _ = ContrastiveLoss(LossConfig())(_output(a, b, torch.ones(6, dtype=torch.bool)))
    logits = 10.0 * a @ b.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    smoothed, _ = ContrastiveLoss(LossConfig(label_smoothing=0.1))(_output(a, b, torch.ones(6, dtype=torch.bool)))
    expected = (
        F.cross_entropy(logits, labels, label_smoothing=0.1) + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-12)


def test_mask_equals_dropping_the_absent_samples() -> None:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    present = torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    for kind in ("infonce", "siglip"):
        for smoothing in (0.0, 0.2) if kind == "infonce" else (0.0,):
            cfg = LossConfig(kind=kind, label_smoothing=smoothing)
            masked, _ = ContrastiveLoss(cfg)(_output(a, b, present))
            dropped, _ = ContrastiveLoss(cfg)(_output(a[present], b[present], torch.ones(4, dtype=torch.bool)))
            assert masked.item() == pytest.approx(dropped.item(), rel=1e-12)
    none, parts = ContrastiveLoss(LossConfig())(_output(a, b, torch.zeros(6, dtype=torch.bool)))
    assert none.item() == 0.0 and not math.isnan(none.item()) and "text-image" not in parts  # nothing to report


def test_siglip_matches_paper_formula() -> None:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    loss, _ = ContrastiveLoss(LossConfig(kind="siglip"))(_output(a, b, torch.ones(5, dtype=torch.bool)))
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -F.logsigmoid(z * (10.0 * a @ b.T - 10.0)).sum() / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_hard_negatives_match_the_negclip_formula() -> None:
    """image->text: softmax over the captions and every caption's negatives (absent ones dropped, each negative
    counted ``weight`` times); text->image: over the images only; sigmoid: each (image, negative) a -1 pair."""
    g = torch.Generator().manual_seed(0)
    n, k = 5, 2
    a = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)
    negs = F.normalize(torch.randn(n, k, 16, generator=g, dtype=torch.float64), dim=-1)
    present = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1]]).bool()
    out = _output(a, b, torch.ones(n, dtype=torch.bool))
    out.negatives, out.negative_present = negs, present
    live = negs[present]  # [5, 16]: the columns that exist
    labels = torch.arange(n)
    for weight in (1.0, 0.3):
        cfg = LossConfig(hard_negatives=HardNegativesConfig(per_caption=k, weight=weight))
        loss, _ = ContrastiveLoss(cfg)(out)
        i2t = torch.cat([10.0 * b @ a.T, 10.0 * b @ live.T + math.log(weight)], dim=1)
        expected = (F.cross_entropy(10.0 * a @ b.T, labels) + F.cross_entropy(i2t, labels)) / 2
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    sig, _ = ContrastiveLoss(LossConfig(kind="siglip", hard_negatives=HardNegativesConfig(per_caption=k)))(out)
    z = 2 * torch.eye(n, dtype=torch.float64) - 1
    expected = (-F.logsigmoid(z * (10.0 * a @ b.T - 10.0)).sum() - F.logsigmoid(-(10.0 * b @ live.T - 10.0)).sum()) / n
    assert sig.item() == pytest.approx(expected.item(), rel=1e-12)
    # label smoothing spreads over the real captions only
    smooth, _ = ContrastiveLoss(LossConfig(label_smoothing=0.1, hard_negatives=HardNegativesConfig(per_caption=k)))(out)
    logp = torch.cat([10.0 * b @ a.T, 10.0 * b @ live.T], dim=1).log_softmax(dim=-1)
    i2t = -(0.9 * logp[labels, labels] + 0.1 * logp[:, :n].mean(dim=1))
    expected = (F.cross_entropy(10.0 * a @ b.T, labels, label_smoothing=0.1) + i2t.mean()) / 2
    assert smooth.item() == pytest.approx(expected.item(), rel=1e-12)
