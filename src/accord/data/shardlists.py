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

    @property
    def name(self) -> str:
        """Location-independent identity (source index + file name): seeds do not change when data moves."""
        return f"{self.source}:{posixpath.basename(self.url)}"


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
    for url in urls:
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        if folder not in by_folder:
            by_folder[folder] = _sizes_for(folder)
        out.append(Shard(url, by_folder[folder].get(posixpath.basename(url)), index))
    return out


def expand_sources(spec: str) -> list[list[Shard]]:
    """``a::b::c`` -> one shard list per source."""
    return [expand_source(part, i) for i, part in enumerate(spec.split("::")) if part.strip()]


def open_shard(url: str):
    """Binary stream of a shard: local path, any fsspec URL, or ``pipe:COMMAND``."""
    if url.startswith("pipe:"):
        return wds.gopen(url)
    return fsspec.open(url, "rb").open()
