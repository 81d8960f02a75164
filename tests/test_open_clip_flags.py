"""`accord train --open-clip "..."`: open_clip_train's flags become accord's keys (read by open_clip's own parser for
the same command line), every flag accord cannot honour is refused by name, and the schedules it maps to."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex

import pytest

from accord.config import ConfigError, load_config
from accord.resources import config_file
from accord.train import open_clip_flags
from accord.train.config import OptimConfig, TrainConfig
from accord.train.main import main
from accord.train.optim import lr_at

params = pytest.importorskip("open_clip_train.params")

ISSUE_EXAMPLE = (
    "--train-data '/data/laion/{00000..41455}.tar' --train-num-samples 400000000 --batch-size 256 "
    "--precision amp_bf16 --local-loss --gather-with-grad --lr 5e-4 --wd 0.2 --warmup 2000 --epochs 32 "
    "--model ViT-B-16 --workers 8 --seed 3 --accum-freq 2 --grad-clip-norm 1.0 --report-to wandb,tensorboard "
    "--logs /runs --name b16 --dataset-resampled --lr-scheduler const-cooldown --epochs-cooldown 4 "
    "--lr-cooldown-end 5e-5 --lr-cooldown-power 2"
)


def test_the_open_clip_command_line_becomes_the_same_run() -> None:
    theirs = params.parse_args(shlex.split(ISSUE_EXAMPLE))  # what open_clip_train reads from it
    t = open_clip_flags.translate(ISSUE_EXAMPLE)
    assert t.config == "vit_b16_text" and not t.refused
    cfg = load_config(TrainConfig, config_file(t.config), t.overrides)
    assert cfg.data.train == theirs.train_data and cfg.data.epoch_samples == theirs.train_num_samples
    assert cfg.data.mode == "resampled" and cfg.data.batch_size == theirs.batch_size == 256
    assert cfg.data.workers == theirs.workers and cfg.seed == cfg.data.seed == theirs.seed
    assert cfg.deepspeed.precision == "autocast_bf16" and cfg.loss.gather == "local"
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (theirs.lr, theirs.wd, theirs.warmup)
    assert cfg.epochs == theirs.epochs and cfg.accum_steps == theirs.accum_freq
    assert cfg.optim.grad_clip == theirs.grad_clip_norm and cfg.log.wandb and cfg.log.tensorboard
    assert cfg.output_dir == "/runs/b16" and cfg.log.run_name == "b16"
    assert cfg.optim.schedule == "const-cooldown" and cfg.optim.cooldown_fraction == pytest.approx(4 / 32)
    assert cfg.optim.min_lr_ratio == pytest.approx(theirs.lr_cooldown_end / theirs.lr)
    assert cfg.optim.cooldown_power == theirs.lr_cooldown_power == 2.0
    assert any("always gathers" in n for n in t.notes)
    assert "precision: autocast_bf16" in open_clip_flags.overrides_yaml(t.overrides)


def test_every_mapped_flag_is_open_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table names only flags open_clip_train's own parser has (no invented ones)."""
    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a: parsers.append(self) or parse(self, *a))
    params.parse_args(["--train-data", "x"])
    theirs = {flag for action in parsers[0]._actions for flag in action.option_strings}
    assert len(theirs) > 80
    assert set(open_clip_flags.FLAGS) <= theirs, set(open_clip_flags.FLAGS) - theirs


@pytest.mark.parametrize(
    "flags, named",
    [
        ("--model RN50", "RN50: no shipped config"),
        ("--precision amp", "amp: fp16 autocast"),
        ("--save-frequency 1", "--save-frequency counts epochs"),
        ("--beta1 0.9", "--beta1: set optim.betas"),
        ("--opt sgd", "--opt: accord trains with AdamW only"),
        ("--dataset-type csv", "csv: accord trains on WebDataset shards"),
        ("--force-quick-gelu", "--force-quick-gelu: no accord equivalent"),
        ("--lr-scheduler step", "step: accord's schedules are"),
        ("--epochs-cooldown 2", "--epochs-cooldown needs --epochs"),
    ],
)
def test_flags_accord_cannot_honour_are_refused_by_name(flags: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        open_clip_flags.translate(f"--train-data x --model ViT-B-16 {flags}")


def test_the_command_refuses_with_exit_2_and_one_line() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--open-clip", "--train-data x --model ViT-B-16 --opt sgd --save-frequency 2"])
    assert code == 2 and len(err.getvalue().strip().splitlines()) == 1
    assert "--opt: accord trains with AdamW only" in err.getvalue() and "--save-frequency" in err.getvalue()


def test_synthetic_siglip_and_compile_flags() -> None:
    t = open_clip_flags.translate("--dataset-type synthetic --siglip --torchcompile --skip-scheduler --lock-image")
    cfg = load_config(TrainConfig, config_file("tiny"), [*t.overrides, "max_steps=2"])
    assert cfg.data.synthetic and cfg.loss.kind == "siglip" and cfg.model.init_logit_bias == -10.0
    assert cfg.compile is not None and cfg.optim.schedule == "const" and cfg.optim.warmup_steps == 0
    assert cfg.model.towers["image"].freeze


def test_the_schedules_by_hand() -> None:
    const = OptimConfig(lr=1.0, warmup_steps=2, schedule="const")
    assert [lr_at(s, 10, const) for s in range(10)] == [0.5] + [1.0] * 9
    cool = OptimConfig(lr=1.0, warmup_steps=2, schedule="const-cooldown", cooldown_fraction=0.5, min_lr_ratio=0.2)
    got = [lr_at(s, 10, cool) for s in range(10)]
    assert got == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])  # 5 cooldown steps, floor on the last
    square = OptimConfig(lr=1.0, warmup_steps=0, schedule="const-cooldown", cooldown_fraction=0.5, cooldown_power=2)
    assert [lr_at(s, 10, square) for s in range(5, 10)] == pytest.approx([1, 0.5625, 0.25, 0.0625, 0])
    with pytest.raises(ConfigError, match="cooldown_fraction"):
        OptimConfig(cooldown_fraction=0.0).validate("optim")
