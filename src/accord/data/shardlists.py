"""Shard lists: brace patterns, directories, ``pipe:`` commands (brace-expanded too), ``a::b`` joined sources; sample
counts from the ``sizes.json`` beside the shards (for ``pipe:``, fetched by the same command)."""

from __future__ import annotations

import json
import posixpath
import shlex
import subprocess
from dataclasses import dataclass

import braceexpand
import fsspec


@dataclass(frozen=True)
class Shard:
    url: str
    size: int | None  # samples, from sizes.json
    source: int  # index of the '::'-joined source it came from
    path: str = ""  # its path below the source's root (the folder all its shards share); default the file name

    @property
    def name(self) -> str:
        """Location-independent identity (source index + path below the source's root): unique within a run, and
        seeds and resume states do not change when the data moves."""
        return f"{self.source}:{self.path or posixpath.basename(self.url)}"


def _below_common_folder(urls: list[str]) -> list[str]:
    """Each URL's path below the deepest folder all of them share (``/d/a/0.tar``, ``/d/b/0.tar`` -> ``a/0.tar``,
    ``b/0.tar``; one folder: the file names)."""
    parts = [u.split("/") for u in urls]
    common = 0
    folders = [p[:-1] for p in parts]
    while all(len(f) > common for f in folders) and len({tuple(f[: common + 1]) for f in folders}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def _fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def _sizes_for(folder_url: str) -> dict[str, int]:
    fs, path = _fs_and_path(folder_url)
    sizes_path = f"{path.rstrip('/')}/sizes.json"
    if not fs.exists(sizes_path):
        return {}
    with fs.open(sizes_path) as f:
        return json.load(f)


def shard_token(command: str) -> str | None:
    """The word of a ``pipe:`` command that names its shard (the last one ending in ``.tar``), e.g. the URL of
    ``curl -s -f http://host/d/shard-000.tar`` or ``aws s3 cp s3://b/d/shard-000.tar -``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    return next((w for w in reversed(words) if w.endswith(".tar")), None)


def _pipe_sizes(command: str, token: str, timeout_s: float = 60.0) -> dict[str, int]:
    """sizes.json beside a ``pipe:`` command's shard, read by the same command with the shard's name replaced
    (``{}`` where the command fails or prints no JSON object)."""
    folder = token.rsplit("/", 1)[0] if "/" in token else "."
    try:
        out = subprocess.run(
            command.replace(token, f"{folder}/sizes.json"), shell=True, capture_output=True, timeout=timeout_s
        )
        sizes = json.loads(out.stdout) if out.returncode == 0 else {}
    except (subprocess.TimeoutExpired, ValueError):
        return {}
    return sizes if isinstance(sizes, dict) else {}


def pipe_source(command: str, index: int) -> list[Shard]:
    """``pipe:`` shards: the command brace-expanded (open_clip's ``pipe:aws s3 cp s3://b/{000..099}.tar -``
    strings), each shard named by its ``.tar`` word, sized by the sizes.json beside it."""
    commands = list(braceexpand.braceexpand(command))
    tokens = [shard_token(c) for c in commands]
    if any(t is None for t in tokens):  # no shard word to name it by: the command is its name
        return [Shard(f"pipe:{c}", None, index, c) for c in commands]
    words = [t for t in tokens if t is not None]
    by_folder: dict[str, dict[str, int]] = {}
    out = []
    for cmd, word, below in zip(commands, words, _below_common_folder(words), strict=True):
        folder = word.rsplit("/", 1)[0] if "/" in word else "."
        if folder not in by_folder:
            by_folder[folder] = _pipe_sizes(cmd, word)
        out.append(Shard(f"pipe:{cmd}", by_folder[folder].get(posixpath.basename(word)), index, below))
    return out


def expand_source(spec: str, index: int = 0) -> list[Shard]:
    """One source: a directory (all ``*.tar`` in it), a brace pattern, or a single tar / ``pipe:`` command."""
    spec = spec.strip()
    if spec.startswith("pipe:"):
        return _unique(pipe_source(spec[5:], index), spec)
    if "{" not in spec and not spec.endswith(".tar"):
        fs, path = _fs_and_path(spec)
        if not fs.isdir(path):
            raise FileNotFoundError(f"data source {spec!r}: not a directory or .tar pattern")
        names = sorted(posixpath.basename(p) for p in fs.glob(f"{path.rstrip('/')}/*.tar"))
        if not names:
            raise FileNotFoundError(f"data source {spec!r}: no .tar shards in it")
        sizes = _sizes_for(spec)
        base = spec.rstrip("/")
        return [Shard(f"{base}/{n}", sizes.get(n), index) for n in names]
    urls = list(braceexpand.braceexpand(spec))
    by_folder: dict[str, dict[str, int]] = {}
    out = []
    for url, below in zip(urls, _below_common_folder(urls), strict=True):
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        if folder not in by_folder:
            by_folder[folder] = _sizes_for(folder)
        out.append(Shard(url, by_folder[folder].get(posixpath.basename(url)), index, below))
    return _unique(out, spec)


def _unique(shards: list[Shard], spec: str) -> list[Shard]:
    if len({s.name for s in shards}) < len(shards):
        dup = next(s.url for s in shards if sum(o.name == s.name for o in shards) > 1)
        raise ValueError(f"data source {spec!r}: {dup} is listed more than once")
    return shards


def expand_sources(spec: str) -> list[list[Shard]]:
    """``a::b::c`` -> one shard list per source."""
    return [expand_source(part, i) for i, part in enumerate(spec.split("::")) if part.strip()]
