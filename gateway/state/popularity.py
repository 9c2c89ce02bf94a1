"""How often clients were routed to each file: admission hashes the most requested first.

Counted per repository and path, across commits, so a new commit's files are weighted by what
clients asked of the commits before it. Only files the catalog lists are counted (the caller
counts after the catalog lookup), and at most ``FILES_COUNTED`` of them, least recently
requested dropped first, so a client sending endless paths cannot grow it.
"""

from __future__ import annotations

from gateway.hf.paths import FileRef, RepoType
from gateway.lru import LRUCache

#: Files whose request counts are kept.
FILES_COUNTED = 65_536

_FileKey = tuple[RepoType, str, str]


class RequestCounts:
    """Requests per catalogued file, in one gateway process since it started."""

    __slots__ = ("_counts",)

    def __init__(self, limit: int = FILES_COUNTED) -> None:
        self._counts: LRUCache[_FileKey, int] = LRUCache(limit)

    def count(self, ref: FileRef) -> None:
        key = (ref.repo_type, ref.repo_id, ref.filename)
        self._counts.put(key, (self._counts.peek(key) or 0) + 1)

    def of(self, repo_type: RepoType, repo_id: str, path: str) -> int:
        return self._counts.peek((repo_type, repo_id, path)) or 0
