"""Hashes of file content: sha256, git blob sha1 and per-piece sha256, in one pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gateway.hf.catalog import FileMeta

_READ_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Digest:
    size: int
    sha256: str
    #: Git's object id of the content as a blob: a plain (non-LFS) file's etag upstream.
    blob_sha1: str
    #: sha256 of each ``piece_bytes`` piece, the last one shorter.
    pieces: tuple[str, ...]

    def mismatch(self, meta: FileMeta) -> str | None:
        """Why this content is not upstream's file ``meta``, or None if it is."""
        if self.size != meta.size:
            return f"size {self.size} != upstream size {meta.size}"
        # An LFS file's etag is the sha256 of its content; a plain git file's its blob sha1.
        actual = self.sha256 if meta.lfs else self.blob_sha1
        if actual != meta.etag:
            kind = "sha256" if meta.lfs else "git blob sha1"
            return f"{kind} {actual} != upstream {meta.etag}"
        return None


class Hasher:
    """Feeds content in order; ``digest()`` once it is complete."""

    def __init__(self, expected_size: int, piece_bytes: int) -> None:
        self._sha256 = hashlib.sha256()
        # The blob header needs the size up front: the expected one. Content of another size
        # fails the size check before the blob id is looked at.
        self._blob = hashlib.sha1(f"blob {expected_size}\0".encode(), usedforsecurity=False)
        self._piece_bytes = piece_bytes
        self._piece = hashlib.sha256()
        self._piece_fill = 0
        self._pieces: list[str] = []
        self.size = 0

    def update(self, data: bytes) -> None:
        self._sha256.update(data)
        self._blob.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._piece_bytes - self._piece_fill)
            self._piece.update(view[:take])
            self._piece_fill += take
            view = view[take:]
            if self._piece_fill == self._piece_bytes:
                self._pieces.append(self._piece.hexdigest())
                self._piece = hashlib.sha256()
                self._piece_fill = 0

    def digest(self) -> Digest:
        pieces = list(self._pieces)
        if self._piece_fill:
            pieces.append(self._piece.hexdigest())
        return Digest(self.size, self._sha256.hexdigest(), self._blob.hexdigest(), tuple(pieces))


def hash_file(path: Path, expected_size: int, piece_bytes: int) -> Digest:
    """Hash a file on disk (blocking: call it in a thread from async code)."""
    hasher = Hasher(expected_size, piece_bytes)
    with path.open("rb") as f:
        while chunk := f.read(_READ_BYTES):
            hasher.update(chunk)
    return hasher.digest()
