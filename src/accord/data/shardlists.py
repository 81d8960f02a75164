"""Shard lists: brace patterns, directories, ``a::b`` joined sources; sample counts from ``sizes.json``."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import braceexpand
import fsspec
import webdataset as wds


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


def expand_source(spec: str, index: int = 0) -> list[Shard]:
    """One source: a directory (all ``*.tar`` in it), a brace pattern, or a single tar / ``pipe:`` command."""
    spec = spec.strip()
    if spec.startswith("pipe:"):
        return [Shard(spec, None, index)]
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
    if len({s.name for s in out}) < len(out):
        dup = next(s.url for s in out if sum(o.name == s.name for o in out) > 1)
        raise ValueError(f"data source {spec!r}: {dup} is listed more than once")
    return out


def expand_sources(spec: str) -> list[list[Shard]]:
    """``a::b::c`` -> one shard list per source."""
    return [expand_source(part, i) for i, part in enumerate(spec.split("::")) if part.strip()]


def open_shard(url: str):
    """Binary stream of a shard: local path, any fsspec URL, or ``pipe:COMMAND``."""
    if url.startswith("pipe:"):
        return wds.gopen(url)
    return fsspec.open(url, "rb").open()
