"""The daily hash check: re-hash published files, quarantine bad ones, republish the manifest.

Each run hashes a ``share`` of the files the records list (1.0: all of them), going on where
the previous run stopped, so that ``share=0.25`` checks everything every four runs. A file
whose size or sha256 differs from its record (or that is gone) is moved to
``.mirror-node/quarantine/{time}/``, together with every hard link to the same inode in other
commits, and its commits are marked broken: the manifest, written again at the end, no longer
lists them, and the gateway stops routing them here at its next read. The next sync downloads
what is missing and publishes the commit again.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.hf.paths import FileRef
from gateway.node.digest import hash_file
from gateway.node.manifest import write_manifest
from gateway.node.store import FileRecord, NodeTree, RepoRecord, StoreError, write_json_atomic

#: (record, commit, file)
Entry = tuple[RepoRecord, str, FileRecord]


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    total: int = 0
    #: "repo@commit/path: why"
    damaged: list[str] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)


def window(total: int, share: float, cursor: int) -> tuple[list[int], int]:
    """Indices to check this run and the next run's cursor (pure)."""
    if total == 0:
        return [], 0
    count = min(total, math.ceil(total * share))
    start = cursor % total
    return [(start + i) % total for i in range(count)], (start + count) % total


def _problem(path: Path, f: FileRecord, piece_bytes: int) -> str | None:
    try:
        digest = hash_file(path, f.size, piece_bytes)
    except FileNotFoundError:
        return "missing"
    if digest.size != f.size:
        return f"size {digest.size} != recorded {f.size}"
    if digest.sha256 != f.sha256:
        return f"sha256 {digest.sha256} != recorded {f.sha256}"
    return None


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class Verifier:
    def __init__(self, tree: NodeTree, *, clock: float | None = None) -> None:
        self._tree = tree
        self._now = time.time() if clock is None else clock
        self._stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._now))

    def _path(self, entry: Entry) -> Path:
        record, commit, f = entry
        return self._tree.file_path(FileRef(record.repo_type, record.repo_id, commit, f.path))

    def run(self, share: float) -> VerifyReport:
        tree = self._tree
        node_id = tree.read_node_id()
        if node_id is None:
            raise StoreError(f"{tree.root}: no node here yet (run `node sync` first)")
        records = list(tree.records())
        entries: list[Entry] = [
            (record, sha, f)
            for record in records
            for sha, held in sorted(record.commits.items())
            if held.broken is None and sha not in record.retired
            for f in held.files
        ]
        state_path = tree.state / "verify.json"
        cursor = self._read_cursor(state_path)
        indices, next_cursor = window(len(entries), share, cursor)
        report = VerifyReport(total=len(entries))
        bad: list[tuple[Entry, str]] = []
        for i in indices:
            record, commit, f = entries[i]
            problem = _problem(self._path(entries[i]), f, record.commits[commit].piece_bytes)
            report.checked += 1
            if problem is not None:
                bad.append((entries[i], problem))
        handled: set[int] = set()
        for entry, problem in bad:
            if id(entry) not in handled:
                handled.update(map(id, self._quarantine(entry, problem, entries, report)))
        for record in records:
            tree.write_record(record)
        write_json_atomic(state_path, {"cursor": next_cursor})
        write_manifest(tree, node_id, self._now)
        return report

    def _quarantine(
        self, entry: Entry, problem: str, entries: list[Entry], report: VerifyReport
    ) -> list[Entry]:
        """Quarantine ``entry`` and its hard links; returns every entry it dealt with."""
        path = self._path(entry)
        inode = _inode(path)
        # Hard links share the bad bytes: every commit holding this inode is damaged too.
        same = [entry] + [
            e
            for e in entries
            if e is not entry
            and e[2].sha256 == entry[2].sha256
            and inode is not None
            and _inode(self._path(e)) == inode
        ]
        for record, commit, f in same:
            held = record.commits[commit]
            why = f"{f.path}: {problem}"
            report.damaged.append(f"{record.label}@{commit}/{why}")
            if held.broken is None:
                record.commits[commit] = replace(held, broken=why)
            source = self._path((record, commit, f))
            if not source.exists():
                continue
            destination = (
                self._tree.quarantine_dir(self._stamp)
                / record.repo_type
                / record.repo_id
                / commit
                / f.path
            )
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, destination)
            report.quarantined.append(destination)
        return same

    @staticmethod
    def _read_cursor(path: Path) -> int:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return 0
        cursor = data.get("cursor") if isinstance(data, dict) else None
        return cursor if isinstance(cursor, int) and cursor >= 0 else 0
