"""Enumerate raw inputs (manifests or a directory) into an ordered stream of sample sources.

Every input becomes exactly one :class:`SampleSource`. Inputs that are already known to be unusable at
enumeration time (no caption, unsupported file type, ...) carry an ``error`` and are rejected downstream with
that reason, so that they are accounted for like any other rejected input.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import braceexpand
import fsspec

from accord.errors import InputError
from accord.modalities import COUNTERFACTUAL, MEDIA, medium_of_input

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
PARQUET_BATCH_ROWS = 1024  # rows of a parquet manifest decoded at once (memory: this many rows, twice)
# Fields accord writes into each sample's json; manifest columns may not reuse them.
RESERVED_FIELDS = frozenset({"key", "source", "text", "sha256", COUNTERFACTUAL, *MEDIA})
# Manifest columns of a sample's counterfactual pair: its caption, and its medium per modality
COUNTERFACTUAL_TEXT = f"{COUNTERFACTUAL}_text"
COUNTERFACTUAL_MEDIA = {m: f"{COUNTERFACTUAL}_{m}" for m in MEDIA}


@dataclass
class SampleSource:
    """One input: a caption plus paths (or URLs) of its media, in a fixed position of the build order."""

    index: int
    origin: str  # human-readable location, e.g. "captions.csv:row 12" or "animals/koala"
    text: str | None = None
    media: dict[str, str] = field(default_factory=dict)  # modality -> path/URL
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the input is rejected at enumeration time
    counterfactual: dict[str, str] = field(default_factory=dict)  # modality -> path/URL of the counterfactual medium
    counterfactual_text: str | None = None  # the counterfactual medium's caption

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def read_sources(
    src: str,
    text_column: str = "text",
    media_columns: dict[str, str] | None = None,
) -> list[SampleSource]:
    """All of :func:`iter_sources` in a list: for callers that hold the inputs anyway (small manifests)."""
    return list(iter_sources(src, text_column, media_columns))


def iter_sources(
    src: str,
    text_column: str = "text",
    media_columns: dict[str, str] | None = None,
) -> Iterator[SampleSource]:
    """The inputs of a manifest, several manifests, or a directory (local paths or any fsspec URLs), in build order.

    ``src`` is a directory, a manifest, or a pattern of manifests (braces and globs: ``parts/{0..9}.parquet``,
    ``parts/*.jsonl``), read in sorted order with indices running on across them. The input is checked now (it
    exists, names manifests), the rest as the inputs are read. Manifests are streamed (parquet in row batches, csv /
    tsv / jsonl line by line), so memory does not grow with their size; a directory is listed one folder at a time
    (a folder of millions of files is still listed whole: at scale, nest the folders or give a manifest). A
    manifest's errors (not UTF-8, bad JSON, a column clash or no caption column) raise :class:`InputError` naming
    the file and line, possibly after earlier inputs came."""
    media_columns = media_columns or {m: m for m in MEDIA}
    urls = _manifest_urls(src)  # raised now: a missing input is named before anything is read
    if urls is None:
        fs, path = fsspec.core.url_to_fs(src)
        return _scan_directory(fs, path, src)
    return _read_manifests(urls, text_column, media_columns)


def _read_manifests(urls: list[str], text_column: str, media_columns: dict[str, str]) -> Iterator[SampleSource]:
    index = 0
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        for src in _read_manifest(fs, path, url, text_column, media_columns, index):
            index = src.index + 1
            yield src


def _manifest_urls(src: str) -> list[str] | None:
    """The manifests ``src`` names (sorted), or None when it is a directory; raises when it names nothing usable."""
    patterns = list(braceexpand.braceexpand(src))
    fs, path = fsspec.core.url_to_fs(patterns[0])
    if len(patterns) == 1 and not glob.has_magic(path):
        if not fs.exists(path):
            raise FileNotFoundError(f"--input {src!r} does not exist")
        if fs.isdir(path):
            return None
        if not path.lower().endswith(MANIFEST_SUFFIXES):
            raise InputError(f"--input {src!r} is neither a directory nor a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    urls: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if not glob.has_magic(path):  # named as given: media paths resolve against it as written
            if not fs.exists(path):
                raise FileNotFoundError(f"--input {src!r}: {pattern!r} does not exist")
            urls.append(pattern)
            continue
        found = sorted(fs.glob(path))
        if not found:
            raise FileNotFoundError(f"--input {src!r}: {pattern!r} matches no file")
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        urls += [p if local else fs.unstrip_protocol(p) for p in found]
    for url in urls:
        if not url.lower().endswith(MANIFEST_SUFFIXES):
            raise InputError(f"--input {src!r}: {url!r} is not a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    if len(set(urls)) < len(urls):
        raise InputError(f"--input {src!r} names a manifest twice")
    return urls


def _join(base_url: str, rel: str) -> str:
    """Resolve a manifest path relative to the manifest's folder, leaving absolute paths and URLs alone."""
    if "://" in rel or rel.startswith("/"):
        return rel
    parent = base_url.rsplit("/", 1)[0] if "/" in base_url else "."
    return f"{parent}/{rel}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _text_lines(f: IO[bytes], path: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) of a UTF-8 file (a BOM dropped), one line at a time."""
    offset = 0
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{path}: not UTF-8 text (line {lineno}, byte {offset + e.start}: {e.reason}); "
                "re-encode the manifest as UTF-8"
            ) from None
        offset += len(raw)
        yield lineno, line


def _rows(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[list[str] | None, dict[str, Any]]]:
    """The rows of one manifest as dicts, each with the file's columns when the format declares them up front
    (parquet schema, csv header) or None (jsonl: each row has its own keys)."""
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(f)
            names = list(table.schema_arrow.names)
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield names, row
        elif lower.endswith(".jsonl"):
            for lineno, line in _text_lines(f, path):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}: line {lineno} is not a JSON object")
                yield None, row
        else:
            delimiter = "\t" if lower.endswith(".tsv") else ","
            reader = csv.DictReader((line for _, line in _text_lines(f, path)), delimiter=delimiter)
            header = list(reader.fieldnames or [])
            for row in reader:
                yield header, row


def _read_manifest(
    fs: fsspec.AbstractFileSystem,
    path: str,
    url: str,
    text_column: str,
    media_columns: dict[str, str],
    first_index: int = 0,
) -> Iterator[SampleSource]:
    """The inputs of one manifest, numbered from ``first_index``. The column checks run on the declared columns
    (parquet, csv) before the first row, or as rows come (jsonl): a reserved name at its first row, a missing caption
    or media column once the file ends without one."""
    name = posixpath.basename(path)
    used = {text_column, *media_columns.values(), COUNTERFACTUAL_TEXT, *COUNTERFACTUAL_MEDIA.values()}
    wanted = set(media_columns.values())
    columns: set[str] = set()
    i = -1
    for declared, row in _rows(fs, path):
        i += 1
        if declared is not None and i == 0 or declared is None and not row.keys() <= columns:
            columns.update(declared if declared is not None else row.keys())
            clash = sorted((columns - used) & RESERVED_FIELDS)
            if clash:
                raise InputError(f"{url}: extra columns {clash} clash with fields accord writes; rename them")
            if declared is not None:
                _check_columns(url, columns, text_column, wanted)
        origin = f"{name}:row {i + 1}"
        src = SampleSource(index=first_index + i, origin=origin)
        for modality, column in media_columns.items():
            if not _missing(row.get(column)):
                src.media[modality] = _join(url, str(row[column]))
        for modality, column in COUNTERFACTUAL_MEDIA.items():
            if not _missing(row.get(column)):
                src.counterfactual[modality] = _join(url, str(row[column]))
        if not _missing(row.get(COUNTERFACTUAL_TEXT)):
            src.counterfactual_text = str(row[COUNTERFACTUAL_TEXT]).strip()
        src.extra = {k: v for k, v in row.items() if k not in used}
        text = row.get(text_column)
        if _missing(text):
            src.error = "missing caption"
        else:
            src.text = str(text).strip()
        if src.error is None and not src.media:
            src.error = "no media: needs an image, video or audio path"
        src.error = src.error or _counterfactual_problem(src)
        yield src
    if i >= 0:
        _check_columns(url, columns, text_column, wanted)


def _check_columns(url: str, columns: set[str], text_column: str, media: set[str]) -> None:
    if text_column not in columns:
        raise InputError(f"{url}: no caption column {text_column!r} (columns: {sorted(columns)})")
    if not columns & media:
        raise InputError(f"{url}: needs at least one media column of {sorted(media)}")


def _counterfactual_problem(src: SampleSource) -> str | None:
    """Why ``src``'s counterfactual pair cannot be used, or None (also when it has none): it needs its caption, a
    medium of a modality the sample itself has (a minimal pair of the sample's own medium), and not a caption alone."""
    if not src.counterfactual and src.counterfactual_text is None:
        return None
    if not src.counterfactual:
        return "counterfactual caption without a counterfactual medium"
    if src.counterfactual_text is None:
        return "counterfactual without its caption"
    other = sorted(set(src.counterfactual) - set(src.media))
    if other:
        return f"counterfactual {other[0]} of a sample without {other[0]}"
    return None


def _scan_directory(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Iterator[SampleSource]:
    """Files sharing a stem (relative path without extension) form one sample; files of the stem
    ``<stem>.counterfactual`` are that sample's counterfactual pair. Every file is an input: hidden ones (a name or
    folder starting with ``.``: ``.DS_Store``, ``.git/``) are rejected unread, with that reason; names starting with
    ``_`` (``_DSC0001.JPG``, a camera's default) are read like any other. Samples come in the sorted order of their
    stems, folder by folder: memory holds one folder's listing, never the tree's."""
    yield from _scan_folder(fs, root.rstrip("/"), "", url.rstrip("/"), itertools.count())


def _scan_folder(
    fs: fsspec.AbstractFileSystem, root: str, folder: str, base: str, index: Iterator[int]
) -> Iterator[SampleSource]:
    """The samples of ``root/folder`` and of its subfolders, in the sorted order of their stems: a subfolder ``d``
    sorts as ``d/``, so its stems come where they would in one sorted list of the whole tree."""
    groups: dict[str, list[str]] = {}
    folders: list[str] = []
    for entry in sorted(fs.ls(f"{root}/{folder}" if folder else root, detail=True), key=lambda e: e["name"]):
        name = posixpath.basename(entry["name"].rstrip("/"))
        rel = f"{folder}/{name}" if folder else name
        if entry["type"] == "directory":
            folders.append(rel)
            continue
        dot = name.rfind(".")
        stem = rel[: len(rel) - len(name) + dot] if dot > 0 else rel  # ".DS_Store" is a stem, not an extension
        groups.setdefault(stem, []).append(rel)
    suffix = f".{COUNTERFACTUAL}"
    pairs = {stem[: -len(suffix)]: groups.pop(stem) for stem in list(groups) if stem.endswith(suffix)}
    for owner in set(pairs) - set(groups):  # a counterfactual of no sample: an input of its own, rejected
        groups[owner + suffix] = pairs.pop(owner)
    for key in sorted([*groups, *(f"{d}/" for d in folders)]):
        if key.endswith("/"):
            yield from _scan_folder(fs, root, key[:-1], base, index)
        else:
            yield _stem_sample(fs, root, base, key, groups[key], pairs.get(key, []), next(index))


def _stem_sample(
    fs: fsspec.AbstractFileSystem, root: str, base: str, stem: str, files: list[str], pair: list[str], index: int
) -> SampleSource:
    """The sample of one stem's ``files`` (and its counterfactual ``pair``'s), or its reason to be rejected."""
    src = SampleSource(index=index, origin=stem)
    if any(part.startswith(".") for part in stem.split("/")):
        src.error = f"hidden (a name starting with '.'), not read: {', '.join(files)}"
        return src
    suffix = f".{COUNTERFACTUAL}"
    if stem.endswith(suffix):
        owner = stem[: -len(suffix)]
        src.error = f"counterfactual of no sample (no {owner}.* beside it): {', '.join(files)}"
        return src
    problems: list[str] = []
    for rel in files:
        _read_member(fs, root, base, rel, src, problems)
    for rel in pair:
        _read_member(fs, root, base, rel, src, problems, counterfactual=True)
    if not problems and src.text is None:
        problems.append("missing caption (no .txt)")
    if not problems and not src.media:
        problems.append("no media: needs an image, video or audio file")
    problem = _counterfactual_problem(src)
    if not problems and problem:
        problems.append(problem)
    src.error = "; ".join(problems) or None
    return src


def _read_member(
    fs: fsspec.AbstractFileSystem,
    root: str,
    base: str,
    rel: str,
    src: SampleSource,
    problems: list[str],
    counterfactual: bool = False,
) -> None:
    """One file of a sample's stem into ``src`` (a medium, its caption, its json; ``counterfactual``: of its
    counterfactual pair, which has no json), or its problem into ``problems``."""
    name = posixpath.basename(rel)
    ext = rel.rsplit(".", 1)[-1].lower() if "." in name else ""
    modality = medium_of_input(rel)
    media = src.counterfactual if counterfactual else src.media
    what = f"{COUNTERFACTUAL} " if counterfactual else ""
    if modality is not None:
        if modality in media:
            problems.append(f"several {what}{modality} files ({name})")
        media[modality] = f"{base}/{rel}"
    elif ext == "txt":
        with fs.open(f"{root}/{rel}", "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        text = lines[0].strip() if lines and lines[0].strip() else None
        if text is None:
            problems.append(f"empty {what}caption")
        if counterfactual:
            src.counterfactual_text = text
        else:
            src.text = text
    elif ext == "json" and not counterfactual:
        src.extra.update(_side_json(fs, f"{root}/{rel}", problems))
    else:
        problems.append(f"unsupported file type {name!r}")


def _side_json(fs: fsspec.AbstractFileSystem, path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            meta = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        problems.append(f"invalid json {posixpath.basename(path)!r}")
        return {}
    if not isinstance(meta, dict):
        problems.append(f"json {posixpath.basename(path)!r} is not an object")
        return {}
    return {k: v for k, v in meta.items() if k not in RESERVED_FIELDS}
