"""Fixtures every test gets: /dev/shm and data workers are left as found; session-wide raw media and shards.

Shared helpers live in ``helpers/`` (imported as ``helpers.*``), scripts run as extra ranks in ``workers/``.
"""

import gc
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never look up a hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accord.shards.build import BuildConfig, build  # noqa: E402

from helpers.corpus import make_raw_corpus  # noqa: E402
from helpers.media import solid, write_audio, write_video  # noqa: E402

SHM = Path("/dev/shm")
LOKY = "sem.loky-*"  # joblib's semaphores (see no_leaked_shm_workspace)


@pytest.fixture(autouse=True)
def no_leaked_shm_workspace(request: pytest.FixtureRequest):
    """Every multi-rank run must leave /dev/shm as it found it: DeepSpeed's 66 MB all-reduce files (RAM until
    reboot otherwise) and Python's named semaphores (``sem.mp-*`` of forkserver data workers). A test marked
    ``kills_processes`` SIGKILLs whole process groups, resource trackers included, as a crash does: what those
    leave is removed here, as a reboot would, and not counted."""
    patterns = ("deepspeed_allreduce_buffer_*", "sem.mp-*")
    before = {p: set(SHM.glob(p)) for p in (*patterns, LOKY)}
    yield
    # transformers imports scikit-learn when it is installed (mlflow brings it), and its joblib / loky creates named
    # semaphores at import; a rank that ends by os._exit (a data error, a lost rank) or SIGKILL cannot release them
    for f in set(SHM.glob(LOKY)) - before[LOKY]:
        f.unlink(missing_ok=True)

    def new_files() -> list[Path]:
        return sorted(f for p in patterns for f in set(SHM.glob(p)) - before[p])

    # a semaphore goes when its owner (a loader's queue) is collected and its workers have shut down: give objects
    # the test dropped that moment (at most 2 s) before calling what is left a leak
    leaked, deadline = new_files(), time.monotonic() + 2.0
    while leaked and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
        leaked = new_files()
    for f in leaked:
        f.unlink(missing_ok=True)  # one failure must not fill the machine's RAM for the tests after it
    if request.node.get_closest_marker("kills_processes") is None:
        assert not leaked, f"files left in /dev/shm: {[f.name for f in leaked]}"


def _forkservers() -> set[int]:
    """PIDs of running multiprocessing forkservers (the parents of the loaders' data workers) but the one of this
    pytest process, which serves its in-process loaders for the whole session."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"multiprocessing.forkserver" in (proc / "cmdline").read_bytes():
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != os.getpid():
                    pids.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


@pytest.fixture(autouse=True)
def no_orphaned_data_workers():
    """A run that ends, however it ends (SIGKILL included), must not leave data workers running: they keep CPU,
    memory and /dev/shm tensors, and hold the output pipes of whoever started the run."""
    import signal
    import time

    before = _forkservers()
    yield
    deadline = time.time() + 10  # the workers notice a lost owner within a second or two
    while (left := _forkservers() - before) and time.time() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"forkserver processes left running: {sorted(left)}"


@pytest.fixture(scope="session")
def raw_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_raw_corpus(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """48 samples over 16 shards: images, videos, audio, and image+audio pairs, with captions that describe a
    colour or a pitch (so that a tiny model can learn the alignment). Returns (dir, key -> media)."""
    raw = tmp_path_factory.mktemp("mixed_raw")
    colors = {
        "red": (220, 30, 30),
        "green": (30, 200, 40),
        "blue": (30, 40, 220),
        "yellow": (230, 220, 30),
        "white": (245, 245, 245),
        "black": (10, 10, 10),
    }
    for i in range(48):
        stem = raw / f"s{i:03d}"
        name = list(colors)[(i // 6) % len(colors)]
        pitch = ("low", 220.0) if i % 12 < 6 else ("high", 1760.0)
        if i % 6 == 1:
            write_video(stem.with_suffix(".mp4"), seconds=0.5, size=(32, 24), color=name)
            caption = f"a {name} video"
        elif i % 6 == 2:
            write_audio(stem.with_suffix(".wav"), seconds=0.3, rate=16000, channels=1, freq=pitch[1])
            caption = f"a {pitch[0]} tone"
        else:
            solid(colors[name], 40, 30, seed=i).save(stem.with_suffix(".png"))
            caption = f"a {name} picture"
            stem.with_suffix(".json").write_text(json.dumps({"label": name}))  # zero-shot classes
            if i % 6 == 3:
                write_audio(stem.with_suffix(".flac"), seconds=0.8, rate=8000, channels=1, freq=pitch[1] / 2)
                caption = f"a {name} picture with a {pitch[0]} tone"
        stem.with_suffix(".txt").write_text(caption)
    out = tmp_path_factory.mktemp("mixed_shards")
    build(BuildConfig(input=str(raw), output=str(out), samples_per_shard=3, progress=False))
    media = {}
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as t:
            for name in t.getnames():
                key, ext = name.split(".", 1)
                kind = {"jpg": "image", "mp4": "video", "flac": "audio"}.get(ext)
                media.setdefault(key, set()).update({kind} if kind else set())
    return out, media
