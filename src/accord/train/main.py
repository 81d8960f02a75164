"""Train accord under DeepSpeed ZeRO (stages 0-3) on CPU or GPU, one or many nodes.

deepspeed --num_gpus 8 --module accord.train --config configs/vit_b16_text.yaml [key=value ...]
torchrun --nproc_per_node 8 -m accord.train --config ...
accord train --config configs/tiny.yaml            # one process
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import fsspec
import torch
import torch.distributed as dist

from accord import collectives
from accord.config import ConfigError, load_config, reference, to_dict
from accord.data.batches import empty_batch, lockstep, real_pairs, real_samples, to_device
from accord.data.loader import DataStalled, Loader, NoSamples, TooManyBadSamples, warm_workers
from accord.data.negatives import NegativeSampler, Vocabulary, seen_facts
from accord.data.shardio import ShardUnreadable
from accord.data.synthetic import SyntheticBatches
from accord.evaluation.compositional import read_items
from accord.losses import CaptionLoss, ContrastiveLoss, MatchingLoss
from accord.models import AccordModel
from accord.resources import config_file
from accord.train import checkpoint, flops, open_clip_flags
from accord.train.config import TrainConfig
from accord.train.distributed import (
    LOST_RANK_EXIT,
    Heartbeat,
    describe_rank,
    gather_node_info,
    init_distributed,
    is_comm_failure,
    report_lost_ranks,
)
from accord.train.ds_config import deepspeed_config
from accord.train.metrics import MetricLogger, MetricsWindow, SampleLog
from accord.train.optim import lr_at, param_groups
from accord.train.profile import StepProfiler, stage
from accord.train.step import accumulation_groups, as_fp32, contrastive_step
from accord.train.validate import Validator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="accord train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML training config: a path, or the name of a shipped one (tiny, text_image)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint tag (stepNNNNNNNN) in output_dir")
    p.add_argument(
        "--open-clip",
        metavar="FLAGS",
        help="an open_clip_train command line (quoted) translated to this config's keys; the YAML it makes is "
        "printed, flags accord cannot honour are refused by name (key=value overrides still apply after it)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every config key with its type, default and meaning (with --config: and its value), then exit",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="the libraries' logs too (taken off argv by the entry points, listed here for --help)",
    )
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. optim.lr=1e-3 deepspeed.zero_stage=3")
    args = p.parse_args(argv)
    if args.config is None and not args.print_config and args.open_clip is None:
        p.error("the following arguments are required: --config")
    return args


def from_open_clip(args: argparse.Namespace) -> None:
    """Fold ``--open-clip`` into ``args`` (config, overrides, resume) and say what it became (rank 0)."""
    t = open_clip_flags.translate(args.open_clip)
    args.config = args.config or t.config
    if args.config is None:
        raise ConfigError("--open-clip: no --model accord has a config for; pass --config with the towers")
    args.overrides = [*t.overrides, *args.overrides]
    args.resume = args.resume or t.resume
    if os.environ.get("RANK", "0") == "0":
        print(f"open_clip flags as accord config (on {args.config}):", flush=True)
        print(open_clip_flags.overrides_yaml(t.overrides), end="", flush=True)
        for note in t.notes:
            print(f"note: {note}", flush=True)


def negative_sampler(cfg: TrainConfig) -> NegativeSampler | None:
    """The loader's draw of hard negatives (``loss.hard_negatives``), its vocabulary read from the configured
    captions; None without hard negatives."""
    hn = cfg.loss.hard_negatives
    if hn is None:
        return None
    key = "loss.hard_negatives.vocabulary" if hn.vocabulary else "data.train"
    source = hn.vocabulary or cfg.data.train or ""
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isfile(path):
        with fs.open(path, "rt", encoding="utf-8") as f:
            captions = [line.strip() for line in itertools.islice(f, hn.vocabulary_captions) if line.strip()]
    elif "::" not in source and not source.startswith("pipe:") and fs.isdir(path):
        captions = [i.caption for i in read_items(source, Counter(), hn.vocabulary_captions)]
    else:
        raise ConfigError(
            f"{key}: the hard negatives' vocabulary needs a folder of shards or a text file of captions, not "
            f"{source!r} (set loss.hard_negatives.vocabulary)"
        )
    vocab = Vocabulary.from_captions(captions)
    if not captions or not (vocab.noun or vocab.colour or vocab.direction or vocab.pitch):
        raise ConfigError(f"{key}: no caption of {source!r} has a word that an edit could change")
    seen = seen_facts(captions, vocab) if hn.seen_only else None
    return NegativeSampler(vocab, tuple(hn.types), hn.per_caption, seen)


class Trainer:
    """Owns the engine, the loaders and the step counter; ``fit()`` reads top to bottom."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, nodes: list[dict[str, Any]] | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())  # set from LOCAL_RANK at init
        cfg.check_device(self.device.type)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.cuda.tf32
            torch.backends.cudnn.benchmark = cfg.cuda.cudnn_benchmark
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.nodes = nodes or gather_node_info()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
            (self.out / "ranks.json").write_text(json.dumps(self.nodes, indent=1))
            per_node: dict[int, list[str]] = {}
            for info in self.nodes:
                per_node.setdefault(info["node_rank"], []).append(str(info["rank"]))
            print(
                f"{self.world} rank(s) on {len(per_node)} node(s): "
                + "; ".join(f"node {n}: rank {', '.join(r)}" for n, r in sorted(per_node.items())),
                flush=True,
            )
        # A resume on another world size loads DeepSpeed's universal form of the checkpoint.
        self.resume_meta = checkpoint.resolve(self.ckpt_dir, resume) if resume else None
        ds_config = deepspeed_config(cfg, self.device.type)
        self.universal = self.resume_meta is not None and checkpoint.needs_universal(
            self.resume_meta, self.world, cfg.deepspeed.zero_stage
        )
        if self.universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.modalities = tuple(cfg.model.towers)
        self.loss_fn = ContrastiveLoss(cfg.loss)
        self.fusion_pairs = cfg.model.fusion_pairs()
        self.match_loss = None
        if self.fusion_pairs:
            constructed = cfg.loss.hard_negatives is not None and cfg.loss.hard_negatives.match
            self.match_loss = MatchingLoss(
                cfg.loss.match_negatives == "hard", cfg.loss.match_temperature, constructed=constructed
            )
        self.generative_pairs = cfg.model.generative_pairs()
        self.caption_loss = None
        if cfg.model.generative is not None:
            self.caption_loss = CaptionLoss(cfg.model.generative.null_weight)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = AccordModel(cfg.model)
        self.vocab_size = model.towers["text"].backbone.config.vocab_size if "text" in model.towers else None
        counted = flops.count(lambda: self._count_forward(model))  # before the caches: each tower runs once
        self._enable_frozen_caches(model)
        self.flops_per_sample = flops.training_flops(counted, tower_uses(model)) / (FLOP_SAMPLES * self.world)
        if cfg.compile is not None:
            compile_towers(model, cfg)
        if self.rank == 0:
            print(describe_compute(model, cfg, self.flops_per_sample), flush=True)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=ds_config
        )
        # the towers' input dtype: DeepSpeed's bf16 / fp16 cast the weights; autocast_bf16 keeps fp32 inputs
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
        negatives = negative_sampler(cfg) if not cfg.data.synthetic else None
        if negatives is not None and self.rank == 0:
            v = negatives.vocab
            print(
                f"hard negatives: {negatives.per_caption} per caption of {len(negatives.types)} type(s); vocabulary "
                f"{len(v.noun)} nouns, {len(v.colour)} colours, {len(v.size)} sizes"
                + (f"; only within {len(negatives.seen)} seen combinations" if negatives.seen is not None else ""),
                flush=True,
            )
        self.loader: Loader | SyntheticBatches
        if cfg.data.synthetic:
            self.loader = self._synthetic(cfg.data, self.device, self.dtype)
        else:
            self.loader = Loader(
                cfg.data, self.modalities, train=True, negatives=negatives, worker_timeout_s=cfg.dist_timeout_s / 2
            )
        self.validator = Validator(cfg, self.modalities, self.device, self.dtype)
        self.checkpointer = checkpoint.Checkpointer(self.engine, self.ckpt_dir, cfg.checkpoint)
        shards = self.loader.dataset.shards if isinstance(self.loader, Loader) else []
        unknown = [sh.url for sh in shards if sh.size is None]
        if cfg.data.mode == "finite" and unknown and cfg.max_steps is None:
            # The schedule (warmup, cosine, checkpoint.every) is laid out in steps from the epoch's sample count.
            raise ConfigError(
                f"data.train: {len(unknown)} of {len(shards)} shards have no sizes.json entry "
                f"(e.g. {unknown[0]}), so the epoch's length and the learning-rate schedule are unknown: add "
                "sizes.json beside the shards (shard name -> samples) or set max_steps"
            )
        # The schedule's length: each epoch's steps as the ranks' real shares give them (the rank with the most
        # batches sets it), so the learning rate reaches its floor on the run's last step.
        self.total_steps = cfg.max_steps or max(
            1, sum(cast(Loader, self.loader).planned_steps(e, cfg.accum_steps) for e in range(cfg.epochs))
        )
        self.step = 0
        self.epoch = 0  # the epoch of the step being trained (set by fit)
        self.logger = MetricLogger(cfg.log, self.out, self.rank, to_dict(cfg))
        self.samples = SampleLog(self.out, self.rank) if cfg.log.sample_keys else None
        self.profiler = StepProfiler(cfg.log.profile_start, cfg.log.profile_steps, self.out, self.rank)
        self._rng_after_resume: dict[str, Any] | None = None
        if self.resume_meta is not None:
            self._resume(self.resume_meta)
        else:  # a fresh run into an old output_dir starts fresh logs
            self.logger.truncate_after(0)
            if self.samples is not None:
                self.samples.truncate_after(0)
        torch.manual_seed(cfg.seed + 1000 * self.rank + self.step)  # per-rank dropout streams

    def _synthetic(self, data: Any, device: torch.device, dtype: torch.dtype) -> SyntheticBatches:
        """Synthetic batches of ``data``'s shapes for this model (its vocabulary, the loss's negatives per caption)."""
        hn = self.cfg.loss.hard_negatives
        return SyntheticBatches(
            data,
            self.modalities,
            device,
            dtype,
            vocab_size=self.vocab_size,
            negatives=hn.per_caption if hn is not None else 0,
            rank=self.rank,
        )

    def _count_forward(self, model: AccordModel) -> None:
        """One forward of ``model`` and the losses on :data:`FLOP_SAMPLES` synthetic samples per rank (on the CPU,
        before DeepSpeed takes the model; every rank runs it, the losses' collectives included)."""
        batch = self._synthetic(replace(self.cfg.data, batch_size=FLOP_SAMPLES), torch.device("cpu"), torch.float32)
        self._loss(as_fp32(model(batch.batch())), model)  # with autograd on: torch's module tracker needs it

    def _enable_frozen_caches(self, model: AccordModel) -> None:
        """Frozen towers compute each distinct input once (models/frozen_cache.py); not under ZeRO-3, where every
        rank must run every module's forward to gather its partitioned parameters, nor on synthetic data (every
        input is new)."""
        frozen = [m for m, t in model.towers.items() if t.cfg.freeze]
        status: dict[str, str | None]
        if self.cfg.deepspeed.zero_stage == 3:
            status = {m: "ZeRO-3 partitions its parameters (every rank must run it)" for m in frozen}
        elif self.cfg.data.synthetic:
            status = {m: "data.synthetic (every input is new)" for m in frozen}
        else:
            status = model.enable_frozen_caches()
        if self.rank == 0:
            for modality, refusal in status.items():
                cfg = model.towers[modality].cfg
                print(
                    f"{modality} tower frozen: "
                    + (
                        f"features cached (up to {cfg.frozen_cache_items} inputs)"
                        if refusal is None
                        else f"features not cached: {refusal}"
                    ),
                    flush=True,
                )

    # ------------------------------------------------------------------------------------------ checkpoints
    def _resume(self, meta: dict[str, Any]) -> None:
        client, states = self.checkpointer.load(meta, universal=self.universal)
        self.step = client["step"]
        self.loader.load_state_dict([st["loader"] for st in states])
        # The same ranks continue their own random streams; on another world size they start fresh ones.
        self._rng_after_resume = states[self.rank]["rng"] if meta["world"] == self.world else None
        self.logger.truncate_after(self.step)
        if self.samples is not None:
            self.samples.truncate_after(self.step)
        collectives.barrier()  # rank 0 truncated the logs before anyone appends
        if self.rank == 0:
            workers = max(1, self.cfg.data.workers)
            change = ""
            if (meta["world"], meta["workers"]) != (self.world, workers):
                batch = self.cfg.data.batch_size * self.cfg.accum_steps
                change = (
                    f"; elastic: {meta['world']} rank(s) x {meta['workers']} worker(s) -> {self.world} x "
                    f"{workers}, global batch {meta['global_batch']} -> {self.world * batch}"
                    + (" (weights and optimiser through the universal checkpoint)" if self.universal else "")
                )
            print(
                f"resumed from {self.ckpt_dir / meta['tag']} at step {self.step} (epoch {self.loader.epoch}){change}",
                flush=True,
            )

    def save(self) -> None:
        mine = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_states()}
        client = {"step": self.step, "epoch": self.loader.epoch, "config": to_dict(self.cfg)}
        meta = {
            "world": self.world,
            "workers": max(1, self.cfg.data.workers),
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "nodes": len({n["node_rank"] for n in self.nodes}),
            "global_batch": self.world * self.cfg.data.batch_size * self.cfg.accum_steps,
        }
        tag = self.checkpointer.save(self.step, client, mine, meta)
        if self.rank == 0:
            self.logger.progress.write(f"saved checkpoint {self.ckpt_dir / tag}")

    # ------------------------------------------------------------------------------------------------ steps
    def _loss(self, out: Any, module: AccordModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The optimised loss of a model output (contrastive, caption and matching terms with their weights) and
        its logged parts."""
        loss, parts = self.loss_fn(out)
        loss = self.cfg.loss.contrastive_weight * loss
        if self.caption_loss is not None:
            caption, caption_parts = self.caption_loss(out, module.generative, self.generative_pairs)
            loss = loss + self.cfg.loss.caption_weight * caption
            parts = {**parts, **caption_parts}
        if self.match_loss is not None:
            match, match_parts = self.match_loss(out, module.fusion, self.fusion_pairs)
            loss = loss + self.cfg.loss.match_weight * match
            parts = {**parts, **match_parts}
        return loss, parts

    def _backward(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        flags = collectives.all_gather(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]))
        if any(f.item() for f in flags):
            ranks = [r for r, f in enumerate(flags) if f.item()]
            raise FloatingPointError(
                f"non-finite loss at step {self.step} on rank(s) {ranks} (this rank: "
                f"{ {k: float(v) for k, v in parts.items()} }); lower optim.lr or check the data"
            )
        with stage("backward"):
            self.engine.backward(loss, scale_wrt_gas=False)  # the step function already sums micro-batches
        with stage("optimizer_step"):
            self.engine.step()

    def train_step(self, micro_batches: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step over the group of micro-batches (its sample keys logged first, with log.sample_keys)."""
        if self.samples is not None:
            keys = [f"{s}/{k}" for b in micro_batches for s, k in zip(b["__shard__"], b["__key__"], strict=True)]
            self.samples.write(self.step + 1, self.epoch, keys)
        lr = lr_at(self.step, self.total_steps, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # set by param_groups
        if self.match_loss is not None and self.cfg.loss.match_temperature_end is not None:
            start, end = self.cfg.loss.match_temperature or 1.0, self.cfg.loss.match_temperature_end
            self.match_loss.temperature = start * (end / start) ** (self.step / max(1, self.total_steps - 1))
        batches = [to_device(b, self.device, self.dtype) for b in micro_batches]
        holder: dict[str, Any] = {}

        def loss_fn(out):
            with stage("loss"):
                loss, parts = self._loss(out, self.engine.module)
            holder["parts"] = parts
            return loss, parts

        loss, parts = contrastive_step(
            self.engine, loss_fn, batches, backward=lambda loss: self._backward(loss, holder["parts"])
        )
        self.step += 1
        return loss, parts

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (``epochs`` of data, or ``max_steps``), evaluating and saving as the policies say."""
        if self._rng_after_resume is not None:
            checkpoint.set_rng_states(self._rng_after_resume)
        window = MetricsWindow()
        last_eval: dict[str, float] = {}
        self.logger.progress.start(self.step, self.total_steps)
        while self._more_epochs():
            # The epoch these steps train on: the loader's counter moves on as soon as its last batch is taken,
            # which with accum_steps > 1 happens while the epoch's last group is being filled.
            self.epoch = self.loader.epoch
            groups = self._epoch_groups()
            while self._more_steps():
                self.profiler.before_step(self.step + 1)
                t0 = time.perf_counter()
                with stage("data_wait"):
                    group = next(groups, None)
                wait_s = time.perf_counter() - t0
                if group is None:  # every rank is out of data: the epoch is over
                    if self.step == 0:  # and none of it was data: stop (with max_steps this would loop for good)
                        raise NoSamples(self._no_samples())
                    break
                loss, parts = self.train_step(group)
                samples, pairs = sum(real_samples(b) for b in group), sum(real_pairs(b) for b in group)
                window.add(samples, wait_s, float(loss), {k: float(v) for k, v in parts.items()}, pairs)
                self.logger.progress.update(self.step, float(loss), window.samples / max(window.elapsed_s(), 1e-9))
                if self.logger.should_log(self.step, self.total_steps):
                    with stage("log"):
                        self._log(window)
                    window = MetricsWindow()
                self._report_profile(self.profiler.after_step(self.step))
                if self.validator.should_eval(self.step):
                    last_eval = self.evaluate()
                if self.checkpointer.should_save(self.step, self.total_steps):
                    self.save()
        self._report_profile(self.profiler.close(self.step))  # a window the run ended inside
        if self.validator.should_eval(self.step, last=True):
            last_eval = self.evaluate()
        if self.checkpointer.should_save(self.step, self.total_steps, last=True):
            self.save()
        self.logger.close()
        if isinstance(self.loader, Loader):  # samples read and skipped by reason (accord report)
            (self.out / f"data_rank{self.rank:05d}.json").write_text(json.dumps(self.loader.report()))
        return {"step": self.step, "epoch": self.loader.epoch, "eval": last_eval}

    def _no_samples(self) -> str:
        stats = self.loader.skip_stats()
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()) if k != "seen") or "none"
        return f"an epoch of data.train gave no batch: {stats.get('seen', 0)} samples seen on this rank ({reasons})"

    # max_steps counts steps; epochs count data: an epoch ends when every rank is out of samples (total_steps counts
    # those steps; bad samples can end an epoch a step or so earlier, an elastic resume changes the plan).
    def _more_epochs(self) -> bool:
        return self.step < self.total_steps if self.cfg.max_steps is not None else self.loader.epoch < self.cfg.epochs

    def _more_steps(self) -> bool:
        return self.cfg.max_steps is None or self.step < self.total_steps

    def _epoch_groups(self) -> Iterator[list[dict[str, Any]]]:
        """This epoch's optimiser steps as groups of ``accum_steps`` micro-batches, in lock-step across ranks."""
        size, pairs = self.cfg.data.batch_size, self.cfg.data.counterfactuals
        batches = lockstep(iter(self.loader), self.modalities, size, pairs)
        return accumulation_groups(batches, self.cfg.accum_steps, lambda: empty_batch(self.modalities, size, pairs))

    def _report_profile(self, stages: dict[str, float] | None) -> None:
        if stages is not None and self.rank == 0:
            self.logger.progress.write(
                f"profile of steps {self.cfg.log.profile_start}-{self.step} (ms per step, rank 0; traces in "
                f"{self.profiler.folder}): " + ", ".join(f"{k} {v:g}" for k, v in stages.items())
            )

    def _log(self, window: MetricsWindow) -> None:
        elapsed = window.elapsed_s()
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        skips = self.loader.skip_stats()
        io = [skips.get("io: retries", 0), skips.get("io: failures", 0)]
        stats = torch.tensor(
            [window.samples, window.wait_s, elapsed, peak_rss_mib, *io, window.pairs], dtype=torch.float64
        )
        per_rank = collectives.all_gather(stats)
        parts = {}
        for k, vs in window.parts.items():  # each rank's loss share; their mean is the global-batch loss
            t = collectives.all_reduce(torch.tensor(sum(vs) / len(vs), dtype=torch.float64))
            parts[f"loss/{k}"] = float(t) / self.world
        bad = sum(v for k, v in skips.items() if k.startswith("bad: "))
        skipped = collectives.all_reduce(torch.tensor([bad], dtype=torch.float64))
        temps = {f"temperature/{k}": v for k, v in self._temperatures().items()}
        grad_norm = self.engine.get_global_grad_norm()
        samples_per_s = float(sum(r[0] for r in per_rank) / max(r[2] for r in per_rank))
        metrics = {
            "epoch": self.epoch,
            "loss": sum(self._weight(k[5:]) * v for k, v in parts.items()) if parts else float("nan"),
            **parts,
            **temps,
            "lr": lr_at(self.step - 1, self.total_steps, self.cfg.optim),  # towers with lr_scale: times that
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": samples_per_s,
            "samples_per_s_per_rank": [round(float(r[0] / r[2]), 2) for r in per_rank],
            "data_wait_s_per_rank": [round(float(r[1]), 3) for r in per_rank],
            "peak_rss_mib_per_rank": [round(float(r[3])) for r in per_rank],  # the rank's process, not its workers
            "skipped_samples": int(skipped.item()),
            "io/retries": int(sum(r[4] for r in per_rank)),  # remote shards reopened after a fault, since the start
            "io/failures": int(sum(r[5] for r in per_rank)),  # shards given up on (the run stops)
            "io/retries_per_rank": [int(r[4]) for r in per_rank],
            **({"counterfactual_pairs": int(sum(r[6] for r in per_rank))} if self.cfg.data.counterfactuals else {}),
            **self.engine.module.frozen_cache_stats(),  # rank 0's
            **self._perf(samples_per_s),
        }
        pairs = " ".join(f"{k[5:]} {v:.3f}" for k, v in parts.items())
        console = (
            f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {metrics['loss']:.4f} ({pairs}) "
            f"lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s"
            + (f" MFU {100 * metrics['perf/mfu']:.1f}%" if metrics.get("perf/mfu") is not None else "")
        )
        printed = self.logger.should_print(self.step, self.total_steps)
        self.logger.log(self.step, metrics, console=console if printed else None)

    def _perf(self, samples_per_s: float) -> dict[str, float | None]:
        """Achieved model TFLOP/s per device, MFU against the device's peak (None where unknown), peak memory."""
        tflops = self.flops_per_sample * samples_per_s / self.world / 1e12
        peak = self.cfg.log.peak_tflops
        if peak is None and self.device.type == "cuda":
            precision = flops.math_precision(self.cfg.deepspeed.precision, self.cfg.cuda.tf32)
            peak = flops.peak_tflops(torch.cuda.get_device_name(self.device), precision)
        return {
            "perf/model_tflops": tflops,
            "perf/mfu": tflops / peak if peak else None,
            "perf/peak_memory_gib": flops.peak_memory_gib(self.device),
        }

    def _weight(self, part: str) -> float:
        """The weight of a logged loss part ("text-image", "match/text-image", "caption/text-image",
        "caption_null/text-image") in the optimised loss."""
        loss = self.cfg.loss
        if part.startswith("match/"):
            return loss.match_weight
        if part.startswith("caption/"):
            return loss.caption_weight
        if part.startswith("caption_null/"):
            assert self.cfg.model.generative is not None
            return loss.caption_weight * self.cfg.model.generative.null_weight
        return loss.contrastive_weight * loss.pair_weights.get(part, 1.0)

    def _temperatures(self) -> dict[str, float]:
        import deepspeed

        module = self.engine.module
        params = list(module.logit_scale.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.deepspeed.zero_stage == 3):
            return {k: float(1.0 / v.detach().float()) for k, v in module.temperatures().items()}

    def evaluate(self) -> dict[str, float]:
        metrics = self.validator.evaluate(self.engine, self.step)
        self.logger.log(
            self.step,
            {f"eval/{k}": v for k, v in metrics.items()},
            console="eval " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("R@1", "top1"))),
        )
        return metrics


FLOP_SAMPLES = 2  # samples per rank in the FLOP count


def tower_uses(model: AccordModel) -> dict[str, flops.Use]:
    """How each tower's backbone spends a step: trained (any trainable layer; a cut-layer tower counts whole),
    frozen, or cached (its features come from the frozen-feature cache)."""
    return {
        m: "cached" if t.cache is not None and t.cut is None else "frozen" if t.fully_frozen else "trained"
        for m, t in model.towers.items()
    }


def compile_towers(model: AccordModel, cfg: TrainConfig) -> None:
    """``torch.compile`` every tower's backbone in place (``nn.Module.compile``: names and checkpoints unchanged;
    a backbone shared by two towers once). A cut-layer tower's frozen bottom, run layer by layer, stays eager."""
    assert cfg.compile is not None
    done: set[int] = set()
    for tower in model.towers.values():
        if id(tower.backbone) in done:
            continue
        done.add(id(tower.backbone))
        c = cfg.compile
        tower.backbone.compile(mode=c.mode, dynamic=c.dynamic, backend=c.backend, fullgraph=c.fullgraph)


def describe_compute(model: AccordModel, cfg: TrainConfig, flops_per_sample: float) -> str:
    """One line at start: each tower's attention kernel (transformers' ``attn_implementation``) and use, whether
    compiled, the precision, and the counted model FLOPs per sample."""
    uses = tower_uses(model)
    towers = ", ".join(
        f"{m} {getattr(t.backbone.config, '_attn_implementation', None) or 'eager'} ({uses[m]})"
        for m, t in model.towers.items()
    )
    compiled = f"compiled ({cfg.compile.backend}, {cfg.compile.mode})" if cfg.compile is not None else "eager"
    heads = "; heads: torch sdpa" if model.fusion is not None or model.generative is not None else ""
    return (
        f"towers: {towers}{heads}; {compiled}; precision {cfg.deepspeed.precision}; "
        f"{flops_per_sample / 1e9:.3g} GFLOP per training sample"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config and args.config is None and args.open_clip is None:
        print(reference(TrainConfig), end="")
        return 0
    try:
        if args.open_clip is not None:
            from_open_clip(args)
        cfg = load_config(TrainConfig, config_file(args.config), args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"accord train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(reference(TrainConfig, cfg), end="")
        return 0
    init_distributed(cfg.dist_timeout_s)
    if not cfg.data.synthetic:  # the data workers' imports run beside the model's construction
        warm_workers(cfg.data, tuple(cfg.model.towers))
    nodes = gather_node_info()
    heartbeat = Heartbeat() if dist.get_world_size() > 1 else None
    trainer = None
    code = 0
    try:
        trainer = Trainer(cfg, resume=args.resume, nodes=nodes)
        result = trainer.fit()
        if dist.get_rank() == 0:
            print(json.dumps({"done": result}, default=str), flush=True)
        collectives.barrier()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if trainer is not None:  # the run had started: a bug, not an input
            raise
        print(f"accord train: error: {e}", file=sys.stderr)  # every rank finds the same bad input
        code = 2
    except FloatingPointError as e:  # every rank sees the same flags (all-gathered): all stop here, no hang
        print(f"accord train: error: {e}", file=sys.stderr)
        code = 2
    except (
        DataStalled,
        TooManyBadSamples,
        ShardUnreadable,
        NoSamples,
    ) as e:  # this rank's data: say so, tell the others, stop
        stalled = isinstance(e, DataStalled)
        if heartbeat is not None:  # (no collectives)
            heartbeat.report_stop(("its data stalled: " if stalled else "bad data: ") + str(e))
        me = describe_rank(nodes[dist.get_rank()])
        step = trainer.step if trainer is not None else 0
        advice = "Continue the run with --resume latest." if stalled else ""
        print(f"accord train: {me}: at step {step + 1}, {e}. {advice}".rstrip(), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(LOST_RANK_EXIT if stalled else 2)
    except Exception as e:
        if heartbeat is None or not is_comm_failure(e):
            raise
        step = trainer.step if trainer is not None else 0
        print(report_lost_ranks(e, heartbeat, nodes, step, cfg.dist_timeout_s), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(LOST_RANK_EXIT)  # no clean-up: collectives with the lost rank would block again
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    dist.destroy_process_group()
    return code
