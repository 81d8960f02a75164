"""accord.collectives: every collective of accord's own code goes through it, on the backend's device; its audit
names a direct caller and a tensor on a device the backend does not take (2 real gloo ranks)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from accord import collectives

from helpers.procs import ENV, ROOT, WORKERS, free_port, torchrun

TENSOR_COLLECTIVES = set(collectives.AUDITED)


def direct_collectives(src: Path) -> list[str]:
    """``file:line name`` of every call of a torch.distributed collective outside accord/collectives.py."""
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "collectives.py" and path.parent.name == "accord":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in TENSOR_COLLECTIVES
                and ast.unparse(node.func.value) in ("dist", "torch.distributed", "c10d")
            ):
                found.append(f"{path.relative_to(src)}:{node.lineno} {node.func.attr}")
    return found


def test_no_module_but_collectives_calls_torch_distributed(tmp_path: Path) -> None:
    assert direct_collectives(ROOT / "src" / "accord") == []
    # the check fails on a planted direct call (as the lock-step all-reduce was written before)
    shutil.copytree(ROOT / "src" / "accord", tmp_path / "accord", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "accord" / "data" / "batches.py", "a") as f:
        f.write("\n\ndef planted():\n    dist.all_reduce(torch.tensor([1]))\n")
    assert [p.split(":")[0] for p in direct_collectives(tmp_path / "accord")] == ["data/batches.py"]


def test_local_device_index() -> None:
    assert [collectives.local_device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert collectives.local_device_index(3, 1) == 0  # one GPU visible per task (SLURM --gpus-per-task=1)
    with pytest.raises(RuntimeError, match="no accelerator"):
        collectives.local_device_index(0, 0)


def test_the_collective_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert collectives.backend_devices() == ["cpu"] and collectives.collective_device() == torch.device("cpu")
    assert collectives.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # identity without a group
    name = "cudaonly_test"
    dist.Backend.register_backend(
        name, lambda store, r, size, timeout: dist.ProcessGroupGloo(store, r, size, timeout), devices=["cuda"]
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # no GPU here: the current one is device 0
    for backend, devices, device in ((name, ["cuda"], "cuda:0"), ("gloo", ["cpu", "cuda"], "cpu")):
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            assert collectives.backend_devices() == devices
            assert collectives.collective_device() == torch.device(device)
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_at_two_ranks_and_the_audit(tmp_path: Path) -> None:
    proc = subprocess.run(
        torchrun(WORKERS / "collectives_worker.py", str(tmp_path)), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (r["sum"], r["max"], r["x_after"], r["gathered"]) == (3.0, 2.0, rank + 1.0, [1.0, 2.0])
        assert r["global_max"] == 10 and r["objects"] == [{"rank": 0}, {"rank": 1}] and r["broadcast"] == "from 0"
        assert r["device"] == "cpu"
        assert r["direct"].startswith("accord.planted called torch.distributed.all_reduce directly"), r["direct"]
        assert r["backend_devices"] == ["cuda"]
        assert "handed torch.distributed.all_reduce a tensor on cpu" in r["wrong_device"], r["wrong_device"]
        assert "takes cuda tensors only" in r["wrong_device"]


def test_the_tests_launch_every_rank_with_the_audit() -> None:
    """Every multi-rank test (trainer, workers) runs with the audit on: a step, an evaluation or a save whose
    collective bypasses accord.collectives fails there."""
    assert ENV[collectives.AUDIT_ENV] == "1"
    workers = [p for p in WORKERS.glob("*.py") if "init_process_group(" in p.read_text()]
    assert workers and all("collectives.install_audit()" in p.read_text() for p in workers)
