"""open_clip_train's command line as accord's training config: ``accord train --open-clip "--train-data ..."``.

Each flag of ``open_clip_train/params.py`` that accord can honour becomes ``key=value`` overrides; every other flag
is refused with its reason (the run does not start); a flag whose meaning differs slightly is taken with a note.
``--model`` picks the shipped config of the same towers. One table, :data:`FLAGS`, holds every mapping.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from accord.config import ConfigError, apply_overrides

# open_clip model name -> the shipped accord config with the same tower sizes
MODELS = {"ViT-B-16": "vit_b16_text"}
PRECISIONS = {"amp_bf16": "autocast_bf16", "amp_bfloat16": "autocast_bf16", "pure_bf16": "bf16", "bf16": "bf16"}
PRECISIONS |= {"fp32": "fp32"}
SCHEDULES = ("cosine", "const", "const-cooldown")


@dataclass
class Translation:
    """What a command line became: the shipped config (from ``--model``), overrides, ``--resume`` and notes."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    resume: str | None = None
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    seen: dict[str, str | None] = field(default_factory=dict)


Rule = Callable[[Translation, str | None], None]


def _set(*keys: str, convert: Callable[[str], str] = str) -> Rule:
    def rule(t: Translation, value: str | None) -> None:
        assert value is not None
        t.overrides += [f"{k}={convert(value)}" for k in keys]

    return rule


def _const(*overrides: str, note: str | None = None) -> Rule:
    def rule(t: Translation, _value: str | None) -> None:
        t.overrides += list(overrides)
        if note:
            t.notes.append(note)

    return rule


def _refuse(reason: str) -> Rule:
    def rule(t: Translation, _value: str | None) -> None:
        t.refused.append(reason)

    return rule


def _precision(t: Translation, value: str | None) -> None:
    if value in PRECISIONS:
        t.overrides.append(f"deepspeed.precision={PRECISIONS[value]}")
    else:
        t.refused.append(
            f"{value}: fp16 autocast has no DeepSpeed equivalent with the same loss scaling; use amp_bf16 "
            "(deepspeed.precision=autocast_bf16), pure_bf16 (bf16) or fp32"
        )


def _model(t: Translation, value: str | None) -> None:
    if value in MODELS:
        t.config = MODELS[value]
    else:
        t.refused.append(
            f"{value}: no shipped config of those towers (shipped: {', '.join(MODELS)}); pass --config with towers "
            "of your own (configs/vit_b16_text.yaml is the pattern)"
        )


def _scheduler(t: Translation, value: str | None) -> None:
    if value in SCHEDULES:
        t.overrides.append(f"optim.schedule={value}")
        if value != "const":
            t.notes.append(
                f"--lr-scheduler {value}: accord's decay reaches its floor on the last step (open_clip's a step later)"
            )
    else:
        t.refused.append(f"{value}: accord's schedules are {', '.join(SCHEDULES)}")


def _report_to(t: Translation, value: str | None) -> None:
    assert value is not None
    for tool in value.split(","):
        if tool in ("wandb", "tensorboard"):
            t.overrides.append(f"log.{tool}=true")
        elif tool not in ("", "none"):
            t.refused.append(f"{tool}: accord logs to wandb and TensorBoard (log.wandb, log.tensorboard)")


def _siglip(t: Translation, _value: str | None) -> None:
    t.overrides += ["loss.kind=siglip", "model.init_logit_bias=-10.0"]  # open_clip's SigLIP init (bias -10)


def _train_num_samples(t: Translation, value: str | None) -> None:
    t.overrides.append(f"data.epoch_samples={value}")
    if "--dataset-resampled" not in t.seen:
        t.notes.append(
            "--train-num-samples: accord's finite epoch reads every sample once (its size from sizes.json); "
            "data.epoch_samples counts only with --dataset-resampled"
        )


def _dataset_type(t: Translation, value: str | None) -> None:
    if value == "synthetic":
        t.overrides.append("data.synthetic=true")
    elif value not in ("webdataset", "auto"):
        t.refused.append(f"{value}: accord trains on WebDataset shards (accord build-shards turns a CSV into them)")


def _logs(t: Translation, value: str | None) -> None:
    name = t.seen.get("--name") or "accord"
    t.overrides.append(f"output_dir={value}/{name}")


def _resume(t: Translation, value: str | None) -> None:
    t.resume = value


def _ratio_of(flag: str, key: str, why: str) -> Rule:
    """``key`` = the value over the value of ``flag`` (which must be given too: ``why``)."""

    def rule(t: Translation, value: str | None) -> None:
        other = t.seen.get(flag)
        if other is None or value is None:
            t.refused.append(why)
        else:
            t.overrides.append(f"{key}={float(value) / float(other):g}")

    return rule


EPOCH_FREQUENCY = "counts epochs; accord counts optimiser steps: set {key}"
# flag -> (takes a value, rule)
FLAGS: dict[str, tuple[bool, Rule]] = {
    "--train-data": (True, _set("data.train")),
    "--val-data": (True, _set("data.val")),
    "--train-data-upsampling-factors": (True, _set("data.weights", convert=lambda v: "[" + v.replace("::", ",") + "]")),
    "--train-num-samples": (True, _train_num_samples),
    "--dataset-resampled": (False, _const("data.mode=resampled")),
    "--dataset-type": (True, _dataset_type),
    "--workers": (True, _set("data.workers")),
    "--batch-size": (True, _set("data.batch_size")),
    "--epochs": (True, _set("epochs")),
    "--lr": (True, _set("optim.lr")),
    "--wd": (True, _set("optim.weight_decay")),
    "--eps": (True, _set("optim.eps")),
    "--warmup": (True, _set("optim.warmup_steps")),
    "--lr-scheduler": (True, _scheduler),
    "--epochs-cooldown": (
        True,
        _ratio_of(
            "--epochs",
            "optim.cooldown_fraction",
            "--epochs-cooldown needs --epochs (accord's cooldown is a share of the run's steps)",
        ),
    ),
    "--lr-cooldown-end": (
        True,
        _ratio_of(
            "--lr",
            "optim.min_lr_ratio",
            "--lr-cooldown-end needs --lr (accord's floor is a ratio of the peak learning rate)",
        ),
    ),
    "--lr-cooldown-power": (True, _set("optim.cooldown_power")),
    "--skip-scheduler": (False, _const("optim.schedule=const", "optim.warmup_steps=0")),
    "--grad-clip-norm": (True, _set("optim.grad_clip")),
    "--accum-freq": (True, _set("accum_steps")),
    "--precision": (True, _precision),
    "--model": (True, _model),
    "--local-loss": (False, _const("loss.gather=local")),
    "--gather-with-grad": (False, _const(note="--gather-with-grad: accord always gathers features with gradient")),
    "--siglip": (False, _siglip),
    "--torchcompile": (False, _const("compile={}")),
    "--seed": (True, _set("seed", "data.seed")),
    "--log-every-n-steps": (True, _set("log.every")),
    "--report-to": (True, _report_to),
    "--wandb-project-name": (True, _set("log.wandb_project")),
    "--name": (True, _set("log.run_name")),
    "--logs": (True, _logs),
    "--resume": (True, _resume),
    "--lock-image": (False, _const("model.towers.image.freeze=true")),
    "--lock-text": (False, _const("model.towers.text.freeze=true")),
    "--lock-text-unlocked-layers": (True, _set("model.towers.text.unfreeze_last_n")),
    "--coca-caption-loss-weight": (True, _set("loss.caption_weight")),
    "--coca-contrastive-loss-weight": (True, _set("loss.contrastive_weight")),
    # refused, each with its reason
    "--beta1": (True, _refuse("--beta1: set optim.betas=[b1, b2] (one key for both)")),
    "--beta2": (True, _refuse("--beta2: set optim.betas=[b1, b2] (one key for both)")),
    "--opt": (True, _refuse("--opt: accord trains with AdamW only")),
    "--save-frequency": (True, _refuse("--save-frequency " + EPOCH_FREQUENCY.format(key="checkpoint.every"))),
    "--zeroshot-frequency": (True, _refuse("--zeroshot-frequency " + EPOCH_FREQUENCY.format(key="eval.every"))),
    "--val-frequency": (True, _refuse("--val-frequency " + EPOCH_FREQUENCY.format(key="eval.every"))),
    "--imagenet-val": (True, _refuse("--imagenet-val: set eval.zeroshot (classes, templates) on data.val shards")),
    "--imagenet-v2": (True, _refuse("--imagenet-v2: set eval.zeroshot on shards of it")),
    "--pretrained": (True, _refuse("--pretrained: open_clip checkpoints do not load into accord towers")),
    "--lock-image-unlocked-groups": (
        True,
        _refuse("--lock-image-unlocked-groups counts blocks + the final norm: set model.towers.image.unfreeze_last_n"),
    ),
    "--grad-checkpointing": (False, _refuse("--grad-checkpointing: set model.towers.<m>.gradient_checkpointing")),
    "--force-patch-dropout": (True, _set("model.towers.image.patch_dropout")),
    "--horovod": (False, _refuse("--horovod: accord runs under DeepSpeed (deepspeed launcher, torchrun, SLURM)")),
    "--distill-model": (True, _refuse("--distill-model: accord has no distillation")),
    "--dist-backend": (True, _refuse("--dist-backend: accord picks gloo on CPU, NCCL on GPUs")),
}


def translate(command_line: str) -> Translation:
    """The translation of one open_clip_train command line (the flags, without the program name); raises
    :class:`ConfigError` naming every flag it cannot honour, and why."""
    words = shlex.split(command_line)
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        flag, _, inline = words[i].partition("=")
        if not flag.startswith("--"):
            raise ConfigError(f"--open-clip: {words[i]!r} is not a flag")
        known = flag in FLAGS
        takes = FLAGS[flag][0] if known else i + 1 < len(words) and not words[i + 1].startswith("--")
        if takes and not inline:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ConfigError(f"--open-clip: {flag} needs a value")
            inline, i = words[i + 1], i + 1
        pairs.append((flag, inline or None))
        i += 1
    t = Translation(seen=dict(pairs))
    for flag, value in pairs:
        if flag not in FLAGS:
            t.refused.append(f"{flag}: no accord equivalent (or not an open_clip_train flag)")
            continue
        FLAGS[flag][1](t, value)
    if t.refused:
        raise ConfigError("--open-clip: cannot honour " + "; ".join(t.refused))
    return t


def overrides_yaml(overrides: list[str]) -> str:
    """The overrides as the nested YAML a config file would hold."""
    return yaml.safe_dump(apply_overrides({}, overrides), sort_keys=False)
