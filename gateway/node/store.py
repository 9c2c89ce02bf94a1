"""The node's directory: the served tree, and the records of what was verified into it.

Layout under ``root`` (what a web server serves as static files)::

    {prefix}{repo_id}/resolve/{commit}/{path}     published files (prefix: "", datasets/, spaces/)
    manifest.json                                 the manifest the gateway reads
    .mirror-node/node.json                        {"node_id": ...}, for manifest and verify
    .mirror-node/repos/{type}/{repo_id}.json      a repository's record (below)
    .mirror-node/staging/{type}/{repo_id}/{commit}/  commits being downloaded
    .mirror-node/partial/{type}/{repo_id}/{commit}/  files being downloaded
    .mirror-node/quarantine/{stamp}/...           files that failed the hash check
    .mirror-node/verify.json                      where the rolling hash check goes on

A record holds, per commit, every file's size, sha256, upstream etag and piece hashes as they
were verified, and per followed ref the commits synced for it, newest first. Records are ours:
written atomically (a temporary file, then a rename) and read strictly. The web server must not
serve ``.mirror-node`` (config/nginx/node.conf refuses it); no repository id starts with a dot.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.hf.paths import FileRef, RepoType

STATE_DIR = ".mirror-node"
MANIFEST_NAME = "manifest.json"
_PREFIX: Mapping[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_TYPES: Mapping[str, RepoType] = {"model": "model", "dataset": "dataset", "space": "space"}


class StoreError(Exception):
    """A record on disk that cannot be read; the message names the file."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    path: str
    size: int
    sha256: str
    #: Upstream's etag: the sha256 for LFS files, the git blob sha1 for plain files.
    etag: str
    lfs: bool
    pieces: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CommitRecord:
    synced_at: float
    piece_bytes: int
    files: tuple[FileRecord, ...]
    #: Why the commit must not be served (a file failed the hash check); None: fine.
    broken: str | None = None


@dataclass(slots=True)
class RepoRecord:
    repo_type: RepoType
    repo_id: str
    gated: bool = False
    #: followed ref -> synced commits, newest first
    refs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: commits asked for by sha: kept while configured
    pinned: tuple[str, ...] = ()
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    #: commit -> when it left the manifest; removed from disk after ``prune_after_s``
    retired: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.repo_id if self.repo_type == "model" else f"{self.repo_type} {self.repo_id}"


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes it 0600; the web server must be able to read the manifest.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _encode(record: RepoRecord) -> dict[str, Any]:
    return {
        "type": record.repo_type,
        "id": record.repo_id,
        "gated": record.gated,
        "refs": {ref: list(history) for ref, history in record.refs.items()},
        "pinned": list(record.pinned),
        "retired": record.retired,
        "commits": {
            sha: {
                "synced_at": c.synced_at,
                "piece_bytes": c.piece_bytes,
                "broken": c.broken,
                "files": [
                    [f.path, f.size, f.sha256, f.etag, f.lfs, list(f.pieces)] for f in c.files
                ],
            }
            for sha, c in record.commits.items()
        },
    }


def _decode(data: Any) -> RepoRecord:
    # KeyError, TypeError and ValueError all mean "not a record we wrote": the caller says where.
    record = RepoRecord(
        repo_type=_TYPES[data["type"]],
        repo_id=str(data["id"]),
        gated=bool(data["gated"]),
        refs={str(ref): tuple(map(str, history)) for ref, history in data["refs"].items()},
        pinned=tuple(map(str, data["pinned"])),
        retired={str(sha): float(at) for sha, at in data["retired"].items()},
    )
    for sha, c in data["commits"].items():
        files = tuple(
            FileRecord(str(p), int(n), str(s), str(e), bool(lfs), tuple(map(str, pieces)))
            for p, n, s, e, lfs, pieces in c["files"]
        )
        broken = c["broken"]
        record.commits[str(sha)] = CommitRecord(
            float(c["synced_at"]),
            int(c["piece_bytes"]),
            files,
            None if broken is None else str(broken),
        )
    return record


class NodeTree:
    """Paths in a node's root, and its records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def commit_dir(self, repo_type: RepoType, repo_id: str, commit: str) -> Path:
        """Where the web server finds the files of the default node URL template."""
        return self.root / f"{_PREFIX[repo_type]}{repo_id}" / "resolve" / commit

    def file_path(self, ref: FileRef) -> Path:
        return self.commit_dir(ref.repo_type, ref.repo_id, ref.revision) / ref.filename

    def staging_dir(self, repo_type: RepoType, repo_id: str, commit: str) -> Path:
        return self.state / "staging" / repo_type / repo_id / commit

    def partial_dir(self, repo_type: RepoType, repo_id: str, commit: str) -> Path:
        """Downloads in progress: apart from staging, so no name can clash with a file's."""
        return self.state / "partial" / repo_type / repo_id / commit

    def quarantine_dir(self, stamp: str) -> Path:
        return self.state / "quarantine" / stamp

    def _record_path(self, repo_type: RepoType, repo_id: str) -> Path:
        return self.state / "repos" / repo_type / f"{repo_id}.json"

    def read_record(self, repo_type: RepoType, repo_id: str) -> RepoRecord | None:
        path = self._record_path(repo_type, repo_id)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return self._parse(path, text)

    def _parse(self, path: Path, text: str) -> RepoRecord:
        try:
            return _decode(json.loads(text))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{path}: not a repository record ({exc!r})") from None

    def records(self) -> Iterator[RepoRecord]:
        """Every repository record, in path order."""
        base = self.state / "repos"
        for path in sorted(base.rglob("*.json")) if base.is_dir() else ():
            yield self._parse(path, path.read_text(encoding="utf-8"))

    def write_record(self, record: RepoRecord) -> None:
        write_json_atomic(self._record_path(record.repo_type, record.repo_id), _encode(record))

    def read_node_id(self) -> str | None:
        try:
            data = json.loads((self.state / "node.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            raise StoreError(f"{self.state / 'node.json'}: not JSON") from None
        node_id = data.get("node_id") if isinstance(data, dict) else None
        if not isinstance(node_id, str) or not node_id:
            raise StoreError(f"{self.state / 'node.json'}: no node_id")
        return node_id

    def write_node_id(self, node_id: str) -> None:
        write_json_atomic(self.state / "node.json", {"node_id": node_id})
