"""The node manifest the gateway reads (format: gateway/state/manifest.py), built from records.

A commit is listed only when its record is sound (not broken, not retired) and every file it
records is on disk under the published tree with its recorded size: a manifest never names a
file the web server would 404. ``refs`` gives, per followed ref, its newest listed commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.hf.paths import FileRef
from gateway.node.store import CommitRecord, FileRecord, NodeTree, RepoRecord, write_json_atomic

#: (record, commit sha, its record) -> why it is not servable, or None
Check = Callable[[RepoRecord, str, CommitRecord], str | None]


def _file_entry(f: FileRecord, piece_bytes: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": f.path, "size": f.size, "sha256": f.sha256}
    if f.pieces:
        entry["pieces"] = {"length": piece_bytes, "sha256": list(f.pieces)}
    return entry


def listed_commits(record: RepoRecord, check: Check) -> dict[str, CommitRecord]:
    """The commits of ``record`` a manifest may list."""
    return {
        sha: commit
        for sha, commit in record.commits.items()
        if commit.broken is None
        and sha not in record.retired
        and check(record, sha, commit) is None
    }


def manifest_document(
    node_id: str, records: Iterable[RepoRecord], generated_at: float, check: Check
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict; pure given ``check``."""
    repos = []
    for record in records:
        commits = listed_commits(record, check)
        refs = {
            ref: next(c for c in history if c in commits)
            for ref, history in sorted(record.refs.items())
            if any(c in commits for c in history)
        }
        repos.append(
            {
                "type": record.repo_type,
                "id": record.repo_id,
                "refs": refs,
                "commits": {
                    sha: {
                        "synced_at": c.synced_at,
                        "files": [_file_entry(f, c.piece_bytes) for f in c.files],
                    }
                    for sha, c in sorted(commits.items())
                },
            }
        )
    return {"node": node_id, "generated_at": generated_at, "repos": repos}


def on_disk(tree: NodeTree) -> Check:
    """A check that every recorded file is published with its recorded size (a stat each)."""

    def check(record: RepoRecord, sha: str, commit: CommitRecord) -> str | None:
        for f in commit.files:
            path = tree.file_path(FileRef(record.repo_type, record.repo_id, sha, f.path))
            try:
                size = path.stat().st_size
            except OSError:
                return f"{f.path} is missing"
            if size != f.size:
                return f"{f.path} is {size} bytes, recorded {f.size}"
        return None

    return check


def write_manifest(tree: NodeTree, node_id: str, now: float | None = None) -> dict[str, Any]:
    """Rebuild ``{root}/manifest.json`` from the records and the files on disk, atomically."""
    document = manifest_document(
        node_id, list(tree.records()), time.time() if now is None else now, on_disk(tree)
    )
    write_json_atomic(tree.manifest_path, document)
    return document
