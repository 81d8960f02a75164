"""The GPU path's knobs, each at tiny size on CPU: synthetic batches, compiled towers, autocast bf16 under ZeRO 0-3,
fused AdamW, the FLOP count and MFU (against a hand count), and the DeepSpeed JSON they make."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from accord.config import ConfigError, load_config
from accord.data.synthetic import SyntheticBatches
from accord.losses import ContrastiveLoss
from accord.models import AccordModel
from accord.resources import config_file
from accord.train import flops
from accord.train.config import TrainConfig
from accord.train.ds_config import deepspeed_config
from accord.train.main import compile_towers

from helpers.procs import ENV, ROOT, WORKERS
from helpers.tiny import rel_err


def tiny(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, config_file("tiny"), ["data.synthetic=true", "max_steps=2", *overrides])


def test_synthetic_batches_have_the_configured_shapes_and_masks() -> None:
    cfg = tiny("data.batch_size=3", "loss.hard_negatives={per_caption: 2}")
    source = SyntheticBatches(cfg.data, tuple(cfg.model.towers), torch.device("cpu"), vocab_size=50, negatives=2)
    a, b = source.batch(), source.batch()
    assert a["text"]["input_ids"].shape == (3, 32) and a["text"]["attention_mask"].eq(1).all()
    assert 1 <= a["text"]["input_ids"].min() and a["text"]["input_ids"].max() < 50
    assert a["image"]["pixel_values"].shape == (3, 3, 32, 32)
    assert a["video"]["pixel_values"].shape == (3, 4, 3, 32, 32)
    assert a["audio"]["features"].shape == (3, 64, 32)  # 0.64 s at 100 frames/s, 32 mel bins
    assert a["text_negatives"]["input_ids"].shape == (3, 2, 32) and a["text_negatives"]["present"].all()
    assert all(p.all() and len(p) == 3 for p in a["present"].values())
    assert not torch.equal(a["image"]["pixel_values"], b["image"]["pixel_values"])  # fresh inputs: no cache hits
    assert source.state_dict() == {"synthetic_batches": 2}
    again = SyntheticBatches(cfg.data, tuple(cfg.model.towers), torch.device("cpu"), vocab_size=50, negatives=2)
    again.load_state_dict([source.state_dict()])
    assert torch.equal(again.batch()["image"]["pixel_values"], source.batch()["image"]["pixel_values"])


def test_compiled_towers_give_the_eager_loss_and_gradients() -> None:
    """Every tower's backbone compiled (aot_eager: dynamo's graphs and AOTAutograd's backward, no kernel codegen),
    on two caption lengths (a recompile or a dynamic dimension)."""
    cfg = tiny("compile={}", "compile.backend=aot_eager")

    def loss_and_grads(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AccordModel(cfg.model)
        if compiled:
            compile_towers(model, cfg)
        source = SyntheticBatches(cfg.data, tuple(cfg.model.towers), torch.device("cpu"), vocab_size=30522)
        losses = []
        for length in (32, 20):
            batch = source.batch()
            batch["text"] = {k: v[:, :length] for k, v in batch["text"].items()}
            loss, _ = ContrastiveLoss(cfg.loss)(model(batch))
            loss.backward()
            losses.append(loss.item())
        return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = loss_and_grads(False)
    compiled, compiled_grads = loss_and_grads(True)
    assert eager == pytest.approx(compiled, rel=1e-6)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) > 100
    worst = max(rel_err(compiled_grads[n], g, floor=1e-8) for n, g in eager_grads.items())
    assert worst < 1e-4, worst


def test_training_flops_equal_a_hand_count() -> None:
    """A two-tower model of Linear layers: 2 x in x out FLOPs per sample each; the trained tower's backbone, the
    projections and the head x3, a frozen backbone x1, a cached one x0."""

    class Tower(nn.Module):
        def __init__(self, d_in: int, width: int):
            super().__init__()
            self.backbone, self.proj = nn.Linear(d_in, width), nn.Linear(width, 4)

        def forward(self, x):
            return self.proj(self.backbone(x))

    class AccordModel(nn.Module):  # the counter names modules from the outermost one's class
        def __init__(self):
            super().__init__()
            self.towers = nn.ModuleDict({"text": Tower(8, 16), "image": Tower(32, 64)})
            self.head = nn.Linear(4, 2)

        def forward(self, t, i):
            return self.head(self.towers["text"](t) + self.towers["image"](i))

    model, n = AccordModel(), 5
    counted = flops.count(lambda: model(torch.randn(n, 8), torch.randn(n, 32)))
    text_bb, image_bb = 2 * 8 * 16 * n, 2 * 32 * 64 * n
    rest = 2 * 16 * 4 * n + 2 * 64 * 4 * n + 2 * 4 * 2 * n
    assert counted["Global"] == text_bb + image_bb + rest
    for use, k in (("trained", 3), ("frozen", 1), ("cached", 0)):
        got = flops.training_flops(counted, {"text": "trained", "image": use})
        assert got == 3 * (text_bb + rest) + k * image_bb


def test_peaks_and_precisions() -> None:
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", flops.math_precision("fp32", tf32=True)) == 156.0
    assert flops.peak_tflops("cpu", "bf16") is None
    assert flops.math_precision("autocast_bf16", tf32=False) == "bf16"
    assert flops.math_precision("fp32", tf32=False) == "fp32"


def test_the_deepspeed_json_of_the_knobs() -> None:
    autocast = deepspeed_config(tiny("deepspeed.precision=autocast_bf16"))
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not autocast["bf16"]["enabled"]
    assert "torch_autocast" not in deepspeed_config(tiny("deepspeed.precision=bf16"))
    assert "fused" not in deepspeed_config(tiny(), "cpu")["optimizer"]["params"]  # default: off on CPU
    assert deepspeed_config(tiny(), "cuda")["optimizer"]["params"]["fused"] is True  # on on CUDA
    assert "fused" not in deepspeed_config(tiny("optim.fused=false"), "cuda")["optimizer"]["params"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.zero_stage=3", "compile: not with deepspeed.zero_stage 3"),
        ("max_steps=null", "data.synthetic: synthetic batches have no epochs"),
    ],
)
def test_knob_configs_that_cannot_run_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny("compile={}", override)


@pytest.fixture(scope="module")
def knobs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("knobs")
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "knobs_worker.py"), str(out), "aot_eager"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "knobs.json").read_text())


@pytest.mark.slow
def test_autocast_bf16_trains_under_every_zero_stage(knobs: dict) -> None:
    for stage in range(4):
        run = knobs[f"autocast/{stage}"]
        assert run["output_dtypes"] == ["torch.bfloat16"] and run["weight_dtype"] == "torch.float32"
        assert len(run["loss"]) == 3 and run["loss"][-1] < run["loss"][0]
        # bf16 matmuls: close to the fp32 run, not equal to it
        assert run["loss"][0] == pytest.approx(knobs["eager"]["loss"][0], rel=1e-2)
        assert run["loss"][0] != knobs["eager"]["loss"][0]


@pytest.mark.slow
def test_compiled_and_fused_training_equal_eager(knobs: dict) -> None:
    eager = knobs["eager"]
    assert eager["output_dtypes"] == ["torch.float32"]
    assert knobs["compiled"]["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    assert knobs["compiled"]["checksum"] == pytest.approx(eager["checksum"], rel=1e-6)
    assert knobs["fused"]["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    assert knobs["fused"]["checksum"] == pytest.approx(eager["checksum"], rel=1e-6)


@pytest.mark.slow
def test_mfu_in_the_logs(knobs: dict) -> None:
    """perf/model_tflops = counted FLOPs per sample x samples/s (one rank); perf/mfu = that over log.peak_tflops."""
    run = knobs["eager"]
    assert run["flops_per_sample"] > 0
    for sps, tflops, mfu in zip(run["samples_per_s"], run["model_tflops"], run["mfu"], strict=True):
        assert tflops == pytest.approx(run["flops_per_sample"] * sps / 1e12)
        assert mfu == pytest.approx(tflops / 2.0)


@pytest.mark.slow
def test_the_gpu_bench_smoke_run(tmp_path: Path) -> None:
    """bench/gpu.py --smoke: every part of the device check at tiny size on this machine, figures in the folder."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    train = summary["train"]
    assert [(r["batch"], r["variant"]) for r in train] == [(4, "bf16"), (8, "autocast_bf16"), (8, "bf16+compiled")]
    assert all("error" not in r and r["samples_per_s"] > 0 and r["model_tflops"] > 0 for r in train), train
    assert all(r["mfu"] is None for r in train)  # no peak known for a CPU
    assert "compiled (aot_eager" in train[2]["start"] and "eager" in train[0]["start"]
    assert summary["loader"]["steady_samples_per_s"] > 0 and summary["loader"]["workers"] >= 1
    scores = [v for v in summary["score"].values() if isinstance(v, dict)]
    assert scores and all(v["same_score"] for v in scores)
    group = summary["process_group"]
    assert group["timeout_s"] == 60.0 and group["collective_device"] == "cpu" and group["all_reduce_ok"]
    assert {p.name for p in tmp_path.glob("*.json")} == {
        "train.json",
        "loader.json",
        "score.json",
        "process_group.json",
        "summary.json",
    }
    assert "| batch | variant | samples/s |" in proc.stdout
