"""Read back what the builder reads and writes, one item at a time: the samples of a shard folder and the rows of a
manifest, as ``{"id", "text", "image" | "video" | "audio": bytes or path, ...}`` items for scoring and evaluation.

An item that cannot be used carries ``"error"`` (naming the sample or shard) instead of its media, so a caller
counts it rather than losing it. Training reads shards through the streaming loader (``accord.data``) instead.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

from accord.modalities import MEDIA, member_of
from accord.shards.sources import read_sources
from accord.shards.tario import read_tar

Item = dict[str, Any]


def read_sizes(folder: str) -> dict[str, int]:
    """``sizes.json`` of a shard folder (shard name -> sample count); empty when there is none."""
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root.rstrip('/')}/sizes.json"
    return json.loads(fs.cat(path)) if fs.exists(path) else {}


def shard_items(folder: str, with_json: bool = False, keep: tuple[str, ...] = ()) -> Iterator[Item]:
    """Samples of every shard in a folder, streamed (one sample in memory at a time); ``with_json`` adds each
    sample's json bytes as ``"json"``, ``keep`` the bytes of the members with those extensions (or None). A shard
    that yields fewer samples than its sizes.json entry (truncated, corrupt) adds one error item naming it and the
    samples lost."""
    fs, root = fsspec.core.url_to_fs(folder)
    sizes = read_sizes(folder)
    for tar in sorted(fs.glob(f"{root.rstrip('/')}/*.tar")):
        name, read, problem = tar.rsplit("/", 1)[-1], 0, None
        try:
            for key, members in read_tar(fs, tar):
                read += 1
                m = dict(members)
                try:
                    text = m["txt"].decode("utf-8") if "txt" in m else None
                except UnicodeDecodeError:
                    yield {"id": key, "error": f"{name}: the caption of {key} is not UTF-8"}
                    continue
                item: Item = {"id": key, "text": text}
                for medium in MEDIA:
                    ext = member_of(m, medium)
                    if ext is not None:
                        item[medium] = m[ext]
                if with_json:
                    item["json"] = m.get("json")
                for ext in keep:
                    item[ext] = m.get(ext)
                yield item
        except (tarfile.TarError, OSError) as e:
            problem = f"unreadable after {read} samples ({type(e).__name__}: {e})"
        expected = sizes.get(name)
        if problem or (expected is not None and read < expected):
            # "lost": how many samples this one error item stands for (1 where sizes.json does not know)
            lost = max(1, expected - read) if expected is not None else 1
            told = (
                f"{expected - read} of {expected} samples lost (sizes.json)"
                if expected is not None
                else ("an unknown number of samples lost (no sizes.json entry)")
            )
            yield {"id": name, "error": f"{name}: {problem or 'truncated'}; {told}", "lost": lost}


def sample_json(item: Item) -> dict[str, Any] | None:
    """The item's json member as a dict ({} when it has none); None when it is not a JSON object."""
    if not item.get("json"):
        return {}
    try:
        meta = json.loads(item["json"])
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def manifest_items(path: str) -> Iterator[Item]:
    """Items of a manifest; the manifest is read (and its errors raised) now, its media later."""
    sources = read_sources(path)
    return (
        {"id": src.origin, "error": src.error} if src.error else {"id": src.origin, "text": src.text, **src.media}
        for src in sources
    )
