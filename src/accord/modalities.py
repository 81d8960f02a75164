"""The one table of modalities and of the file types each one is stored in.

Two sets of extensions, both derived from one table per medium here:

- **inputs** (``INPUT_EXTS``): raw files the shard builder accepts in a directory or manifest;
- **shard members** (``MEMBER_EXTS``): what a medium's member of a WebDataset sample may be called. It holds every
  extension the builder writes (its image formats, FLAC, and under ``--video-mode keep`` every container of
  ``VIDEO_CONTAINERS``) plus those common in shards made by other tools (``jpeg``, ``wav``, ``ogg``, ``mp3``), and
  is what the loader, ``accord score``, ``accord eval``, ``verify-shards`` and the demo report read.

A test checks that everything the builder can write is a member extension, so the readers cannot drift from it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Container
from typing import Literal, get_args

MEDIA = ("image", "video", "audio")
MODALITIES = ("text", *MEDIA)  # the canonical order: pairs are named in it ("text-image", never "image-text")

# --video-mode keep stores a clip in its own container: input extension -> member extension
VIDEO_CONTAINERS = {"mp4": "mp4", "m4v": "mp4", "webm": "webm", "mkv": "mkv", "mov": "mov", "avi": "avi"}
ImageFormat = Literal["jpg", "png", "webp"]  # what the builder writes (--image-format)
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
AUDIO_FORMAT = "flac"  # what the builder writes

MEMBER_EXTS: dict[str, tuple[str, ...]] = {  # in order of preference when a sample has several
    "image": (*IMAGE_FORMATS, "jpeg"),
    "video": tuple(dict.fromkeys(VIDEO_CONTAINERS.values())),
    "audio": (AUDIO_FORMAT, "wav", "ogg", "mp3"),
}
INPUT_EXTS: dict[str, frozenset[str]] = {
    "image": frozenset({*MEMBER_EXTS["image"], "bmp", "gif", "tif", "tiff", "svg"}),
    "video": frozenset(VIDEO_CONTAINERS),
    "audio": frozenset({*MEMBER_EXTS["audio"], "oga", "opus", "m4a", "aac"}),
}
# A sample's counterfactual pair (a rendered minimal pair: its medium with one thing changed, and that medium's
# caption) is stored in members named "counterfactual.<ext>" and "counterfactual.txt"; readers that do not ask for it
# never see it (no medium's member extension starts with it). Inputs: "<stem>.counterfactual.<ext>" beside "<stem>.*".
COUNTERFACTUAL = "counterfactual"
_MEDIUM_OF_MEMBER = {ext: medium for medium, exts in MEMBER_EXTS.items() for ext in exts}


def medium_of_member(ext: str) -> str | None:
    """The medium a shard member with extension ``ext`` ("jpg", "avi") holds, or None (txt, json, unknown)."""
    return _MEDIUM_OF_MEMBER.get(ext.lower())


def medium_of_input(path: str) -> str | None:
    """The medium of a raw input file by its extension, or None when the builder does not take it."""
    name = posixpath.basename(path)
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return next((medium for medium, exts in INPUT_EXTS.items() if ext in exts), None)


def member_of(sample: Container[str], medium: str, prefix: str = "") -> str | None:
    """The extension of ``sample``'s member holding ``medium`` (a webdataset sample dict), or None; ``prefix``
    :data:`COUNTERFACTUAL` + "." for the member of its counterfactual pair."""
    return next((prefix + ext for ext in MEMBER_EXTS[medium] if prefix + ext in sample), None)
