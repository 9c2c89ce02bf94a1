"""One sync run: every configured revision brought to the node, verified, published.

Per repository and revision: ask upstream which commit the revision names; a commit the node
already holds soundly only moves the ref. Otherwise list its files, keep those the patterns
want, and fill the staging directory: a staged file, or a blob the node already publishes in
another commit (hard-linked in), is checked by hashing it again locally; anything else is
downloaded (see fetch.py). Only when every file verified is the commit published (one rename)
and recorded. Then refs advance, commits beyond ``keep`` per ref are retired, the manifest is
written without them, and retired commits past ``prune_after_s`` are deleted: after the
manifest dropped them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.hf.catalog import FileMeta
from gateway.hf.paths import FileRef, PathError, parse_resolve_path, resolve_path_for
from gateway.node import publish
from gateway.node.digest import Digest, hash_file
from gateway.node.fetch import FetchError, RateLimiter, fetch_file
from gateway.node.manifest import on_disk, write_manifest
from gateway.node.plan import (
    advance,
    due_for_removal,
    is_followed,
    retained,
    select_files,
    to_retire,
)
from gateway.node.progress import Progress, Silent
from gateway.node.settings import NodeSettings, RepoSpec
from gateway.node.store import CommitRecord, FileRecord, NodeTree, RepoRecord
from gateway.node.upstream import Upstream, UpstreamError

_log = logging.getLogger("gateway.node.sync")


@dataclass(slots=True)
class SyncReport:
    #: "repo@commit" of each commit published by this run
    published: list[str] = field(default_factory=list)
    #: "repo@revision: why" of each revision that could not be synced
    failed: list[str] = field(default_factory=list)
    #: "repo@commit" of each commit that left the manifest / the disk
    retired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: Files downloaded, and files reused from staging or by hard link.
    downloaded: int = 0
    reused: int = 0


def _checked_ref(record: RepoRecord, commit: str, path: str) -> FileRef:
    """The file as a validated FileRef: an upstream path with ``..`` or a control character
    could otherwise write outside the commit's directory."""
    ref = FileRef(record.repo_type, record.repo_id, commit, path)
    if parse_resolve_path(resolve_path_for(ref)) != ref:
        raise PathError(400, "invalid_filename", f"{path!r} is not a safe file path")
    return ref


def _file_record(meta: FileMeta, digest: Digest) -> FileRecord:
    return FileRecord(meta.path, meta.size, digest.sha256, meta.etag, meta.lfs, digest.pieces)


class Syncer:
    def __init__(
        self,
        settings: NodeSettings,
        upstream: Upstream,
        *,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._tree = NodeTree(settings.root)
        self._progress = progress or Silent()
        self._clock = clock
        rate = settings.bandwidth_mbps * 1e6 / 8 if settings.bandwidth_mbps else None
        self._limiter = RateLimiter(rate)
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def run(self) -> SyncReport:
        report = SyncReport()
        tree = self._tree
        tree.root.mkdir(parents=True, exist_ok=True)
        tree.write_node_id(self._settings.node_id)
        records = []
        for spec in self._settings.repos:
            records.append(await self._sync_repo(spec, report))
        write_manifest(tree, self._settings.node_id, self._clock())
        # Only now, with a manifest that no longer lists them, may retired commits go.
        now = self._clock()
        for record in records:
            for commit in due_for_removal(record.retired, now, self._settings.prune_after_s):
                publish.remove(tree, record.repo_type, record.repo_id, commit)
                record.commits.pop(commit, None)
                del record.retired[commit]
                report.removed.append(f"{record.label}@{commit}")
                _log.info("removed %s@%s from disk", record.label, commit)
            tree.write_record(record)
        return report

    async def _sync_repo(self, spec: RepoSpec, report: SyncReport) -> RepoRecord:
        tree = self._tree
        record = tree.read_record(spec.repo_type, spec.repo_id) or RepoRecord(
            spec.repo_type, spec.repo_id
        )
        keep = spec.keep or self._settings.keep
        for revision in spec.revisions:
            try:
                commit = await self._sync_revision(spec, record, revision, report)
            except (UpstreamError, FetchError) as exc:
                report.failed.append(f"{record.label}@{revision}: {exc}")
                _log.error("%s@%s not synced: %s", record.label, revision, exc)
                continue
            if is_followed(revision):
                record.refs[revision] = advance(record.refs.get(revision, ()), commit, keep)
            elif commit not in record.pinned:
                record.pinned = (*record.pinned, commit)
            tree.write_record(record)
        # Refs and commits the config no longer names stop holding their commits.
        record.refs = {r: h for r, h in record.refs.items() if r in spec.revisions}
        record.pinned = tuple(c for c in record.pinned if c in spec.revisions)
        # A retired commit a ref names again (a branch moved back) is kept after all.
        for commit in retained(record.refs, record.pinned):
            record.retired.pop(commit, None)
        now = self._clock()
        for commit in to_retire(record.commits, record.refs, record.pinned):
            if commit not in record.retired:
                record.retired[commit] = now
                report.retired.append(f"{record.label}@{commit}")
                _log.info("%s@%s retired: no configured ref keeps it", record.label, commit)
        tree.write_record(record)
        return record

    async def _sync_revision(
        self, spec: RepoSpec, record: RepoRecord, revision: str, report: SyncReport
    ) -> str:
        resolution = await self._upstream.resolve(spec.repo_type, spec.repo_id, revision)
        record.gated = resolution.gated or resolution.private
        commit = resolution.commit
        held = record.commits.get(commit)
        if (
            held is not None
            and held.broken is None
            and on_disk(self._tree)(record, commit, held) is None
        ):
            return commit
        metas = await self._upstream.files(spec.repo_type, spec.repo_id, commit)
        selected = select_files(metas, spec.allow_patterns, spec.ignore_patterns)
        await self._sync_commit(record, commit, selected, report)
        return commit

    def _shared_sources(self, record: RepoRecord) -> dict[tuple[str, int], Path]:
        """Published files of sound commits by (etag, size): candidates for a hard link."""
        sources = {}
        for sha, held in record.commits.items():
            if held.broken is not None or sha in record.retired:
                continue
            for f in held.files:
                path = self._tree.file_path(FileRef(record.repo_type, record.repo_id, sha, f.path))
                sources[(f.etag, f.size)] = path
        return sources

    async def _sync_commit(
        self, record: RepoRecord, commit: str, metas: list[FileMeta], report: SyncReport
    ) -> None:
        tree, settings = self._tree, self._settings
        refs = [_checked_ref_or_fail(record, commit, m.path) for m in metas]
        staging = publish.stage(tree, record.repo_type, record.repo_id, commit)
        publish.drop_extra_files(staging, {m.path for m in metas})
        partial_dir = tree.partial_dir(record.repo_type, record.repo_id, commit)
        sources = self._shared_sources(record)
        label = f"{record.label}@{commit[:7]}"
        self._progress.begin(label, len(metas), sum(m.size for m in metas))

        async def one(ref: FileRef, meta: FileMeta) -> FileRecord:
            async with self._slots:
                result = await self._obtain(
                    ref, meta, staging / meta.path, partial_dir / meta.path, sources, report
                )
            self._progress.file_done()
            return result

        results = await asyncio.gather(
            *(one(r, m) for r, m in zip(refs, metas, strict=True)), return_exceptions=True
        )
        self._progress.end()
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, FetchError | UpstreamError):
                raise failure
        if failures:
            raise FetchError(
                f"commit {commit} not published: {len(failures)} of {len(metas)} files failed; "
                f"first: {failures[0]}"
            )
        files = tuple(r for r in results if isinstance(r, FileRecord))
        publish.publish(tree, record.repo_type, record.repo_id, commit)
        publish.discard_partials(tree, record.repo_type, record.repo_id, commit)
        record.commits[commit] = CommitRecord(self._clock(), settings.piece_bytes, files)
        record.retired.pop(commit, None)
        tree.write_record(record)
        report.published.append(f"{record.label}@{commit}")
        _log.info("published %s@%s (%d files)", record.label, commit, len(files))

    async def _obtain(
        self,
        ref: FileRef,
        meta: FileMeta,
        target: Path,
        partial: Path,
        sources: dict[tuple[str, int], Path],
        report: SyncReport,
    ) -> FileRecord:
        piece_bytes = self._settings.piece_bytes
        # A file staged by an earlier run, or an identical blob another commit publishes
        # (hard-linked in), is verified again locally: the disk may have changed since.
        source = sources.get((meta.etag, meta.size))
        if target.is_file() or (source is not None and publish.share(source, target)):
            digest = await asyncio.to_thread(hash_file, target, meta.size, piece_bytes)
            if digest.mismatch(meta) is None:
                report.reused += 1
                self._progress.advance(meta.size)
                return _file_record(meta, digest)
            target.unlink()
        digest = await fetch_file(
            self._upstream,
            ref,
            meta,
            target,
            partial,
            piece_bytes=piece_bytes,
            retries=self._settings.retries,
            limiter=self._limiter,
            progress=self._progress.advance,
        )
        report.downloaded += 1
        return _file_record(meta, digest)


def _checked_ref_or_fail(record: RepoRecord, commit: str, path: str) -> FileRef:
    try:
        return _checked_ref(record, commit, path)
    except PathError as exc:
        raise FetchError(f"upstream lists {exc.message}") from None
