"""Every shipped config validates; the launch script and the plain CLI train (torchrun: test_multinode.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from accord.config import load_config
from accord.train.config import TrainConfig
from accord.train.ds_config import deepspeed_config

from helpers.procs import ENV, ROOT, free_port


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(TrainConfig, path, ["data.train=/data/shards"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["launch_script", "accord_cli"])
def test_entry_points_train(mixed_shards, tmp_path: Path, how: str) -> None:
    shards, _ = mixed_shards
    overrides = [f"data.train={shards}", f"output_dir={tmp_path}", "max_steps=3", "log.every=1", "data.batch_size=4"]
    config = str(ROOT / "configs/tiny.yaml")
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}  # as users run it: DeepSpeed detects the CPU
    if how == "launch_script":
        overrides += ["log.profile_start=2", "log.profile_steps=2"]
        cmd = ["bash", str(ROOT / "launch/single_node.sh"), config, *overrides]
        env |= {"GPUS": "2", "MASTER_PORT": str(free_port())}
    else:
        cmd = [str(Path(sys.executable).parent / "accord"), "train", "--config", config, "--verbose", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert _steps(tmp_path) == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "step00000003").is_dir()
    noise = ("Setting accelerator to CPU", "Loading weights", "built successfully", "No CUDA runtime", "[INFO]")
    if how == "launch_script":  # quiet by default: accord's own lines only
        assert not [line for line in output.splitlines() if any(n in line for n in noise)], output
        assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("step ")] == [
            ["step", "1/3"],
            ["step", "2/3"],
            ["step", "3/3"],
        ]
        # log.profile_start: a torch.profiler trace per rank and the per-stage table of steps 2-3
        assert "profile of steps 2-3 (ms per step, rank 0" in proc.stdout
        for rank in (0, 1):
            trace = json.loads((tmp_path / f"profile/rank{rank:05d}.trace.json").read_text())
            assert any(e.get("name") == "accord/backward" for e in trace["traceEvents"])
            stages = json.loads((tmp_path / f"profile/rank{rank:05d}.stages.json").read_text())
            assert stages["steps"] == [2, 3]
            table = stages["ms_per_step"]
            assert {
                "data_wait",
                "forward/text",
                "forward/image",
                "forward/video",
                "forward/audio",
                "loss",
                "backward",
                "optimizer_step",
                "step (wall)",
            } <= set(table)
            assert 0 < table["forward/image"] < table["step (wall)"] and table["backward"] > 0
    else:  # --verbose brings the libraries' output back
        assert "Setting accelerator to CPU" in output and "built successfully" in output, output[-3000:]


def run_in_terminal(cmd: list[str], columns: int = 160) -> str:
    """``cmd``'s output as a terminal of ``columns`` columns shows it (a pseudo-terminal on stdout and stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_and_a_pipe_the_log_lines(tmp_path: Path) -> None:
    accord = str(Path(sys.executable).parent / "accord")
    cmd = [accord, "train", "--config", "tiny", "data.synthetic=true", "max_steps=6", "log.every=3"]
    shown = run_in_terminal([*cmd, f"output_dir={tmp_path / 'tty'}"])
    assert "6/6 [" in shown and "step/s, loss=" in shown  # the bar, with the loss
    assert "step 3/6 epoch 0 loss" in shown and "step 6/6 epoch 0 loss" in shown  # the log lines, whole
    # in a pipe: no bar, and with log.console_every the console gets fewer lines than metrics.jsonl gets rows
    out = tmp_path / "pipe"
    piped = subprocess.run([*cmd, f"output_dir={out}", "log.console_every=6"], capture_output=True, text=True, env=ENV)
    assert piped.returncode == 0 and "step/s" not in piped.stdout + piped.stderr
    assert "step 6/6 epoch 0 loss" in piped.stdout and "step 3/6" not in piped.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6]


def test_a_killed_builds_lock_is_removed_and_a_live_one_waited_for(tmp_path: Path, monkeypatch, capsys) -> None:
    """A process killed while it held torch's build lock of DeepSpeed's shm op made every later run on the machine
    hang at start, silently (CI ran out of its 90 minutes so): an old lock is removed with a line, a fresh one is a
    live build and is waited for, untouched."""
    import os
    import threading
    import time

    from accord.train.distributed import SHM_OP, clear_stale_build_lock, shm_op_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (lock,) = shm_op_build_locks()
    assert lock == tmp_path / SHM_OP / "lock"
    clear_stale_build_lock()  # no lock: returns at once
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - 400, time.time() - 400))
    clear_stale_build_lock(stale_after_s=300)
    assert not lock.exists() and f"removed {lock}, left 400 s ago" in capsys.readouterr().err
    lock.touch()
    builder = threading.Timer(0.5, lock.unlink)  # the live build finishing
    builder.start()
    started = time.monotonic()
    clear_stale_build_lock(stale_after_s=300, poll_s=0.05)
    assert time.monotonic() - started >= 0.45 and not builder.is_alive()
    err = capsys.readouterr().err
    assert "waiting for a build of deepspeed_shm_comm" in err and "removed" not in err
