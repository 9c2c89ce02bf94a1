"""What upstream says a repository holds at a revision: its commit and every file's metadata.

Hugging Face clients accept a redirect only with the commit, the file's etag and size, and the
etag names the blob in their cache, so these facts must be right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.hfpath import RepoType


@dataclass(frozen=True, slots=True)
class FileMeta:
    path: str
    size: int
    #: LFS files: the sha256 of the content (64 hex); plain git files: the blob sha1 (40 hex).
    etag: str
    lfs: bool


@dataclass(frozen=True, slots=True)
class RepoRevision:
    repo_type: RepoType
    repo_id: str
    #: The revision as asked for: a branch, tag, ``refs/pr/N`` or a commit sha.
    requested: str
    #: The 40-hex commit it resolves to.
    commit: str
    private: bool
    gated: bool
    files: Mapping[str, FileMeta]
    #: Unix time upstream was asked.
    fetched_at: float

    @property
    def upstream_only(self) -> bool:
        """Private and gated files need the client's token, which only upstream may see."""
        return self.private or self.gated


class CatalogError(Exception):
    """A repository, revision or file that cannot be served, in Hugging Face's own terms."""

    def __init__(
        self,
        status: int,
        error_code: str | None,
        message: str,
        *,
        commit: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        #: Value for ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo);
        #: None for errors the clients should treat as transient.
        self.error_code = error_code
        self.message = message
        #: Known commit, sent as ``X-Repo-Commit`` (EntryNotFound needs it).
        self.commit = commit
        self.retry_after_s = retry_after_s


def is_commit_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
