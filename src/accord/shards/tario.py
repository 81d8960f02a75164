"""Byte-reproducible WebDataset tar files, written under a temporary name and renamed when complete."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator

import fsspec

Sample = tuple[str, list[tuple[str, bytes]]]  # key, [(extension, payload), ...]


def tar_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members occupy in a tar: one 512-byte header each plus data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


def tar_end(offset: int) -> bytes:
    """The bytes :mod:`tarfile` closes an archive of ``offset`` bytes of records with: two zero blocks, then zeros to
    a multiple of its record size."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE)


def member_key(record: bytes) -> str:
    """The sample key of the tar member whose header starts ``record`` (its name up to the first dot of the file
    name)."""
    return key_of(record[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace"))


def key_of(name: str) -> str:
    """A member's sample key: its path up to the first dot of the file name (a/x.jpg and b/x.jpg are two samples,
    as in webdataset)."""
    folder, _, file = name.rpartition("/")
    stem = file.partition(".")[0]
    return f"{folder}/{stem}" if folder else stem


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class TarWriter:
    """Streams samples into ``path`` under a temporary name; ``close()`` renames it into place.

    A tar that was being written when the process died is only ever seen as ``*.tar.tmp``.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, tmp: str | None = None):
        self.fs, self.path, self.tmp = fs, path, tmp or f"{path}.tmp"
        self._raw = fs.open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._raw, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.bytes = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for ext, data in members:
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1
        self.bytes += tar_size(members)

    def close(self) -> None:
        self._tar.close()
        self._raw.close()
        self.fs.mv(self.tmp, self.path)


def write_tar(fs: fsspec.AbstractFileSystem, path: str, samples: Iterable[Sample], tmp: str | None = None) -> int:
    """Write samples to ``path`` atomically (through ``tmp``, default ``path.tmp``); return the number of samples."""
    writer = TarWriter(fs, path, tmp)
    for key, members in samples:
        writer.add(key, members)
    writer.close()
    return writer.count


def read_tar(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Sample]:
    """Samples of a tar in file order, members grouped by key (the path up to the first dot of the file name)."""
    key, members = None, []
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = key_of(info.name), info.name.rpartition("/")[2].partition(".")[2]
            member = tar.extractfile(info)
            assert member is not None  # a regular file
            data = member.read()
            if k != key and key is not None:
                yield key, members
                members = []
            key = k
            members.append((ext, data))
    if key is not None:
        yield key, members
