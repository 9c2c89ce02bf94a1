"""What to mirror: pure decisions over plain data (file selection, which commits to keep)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatch

from gateway.hf.catalog import FileMeta, is_commit_sha


def _normalise(pattern: str) -> str:
    # As huggingface_hub's filter_repo_objects: "folder/" means everything below it.
    return pattern + "*" if pattern.endswith("/") else pattern


def wanted(path: str, allow: Sequence[str], ignore: Sequence[str]) -> bool:
    """Whether ``path`` passes ``allow_patterns`` (empty: all) and no ``ignore_patterns``."""
    if allow and not any(fnmatch(path, _normalise(p)) for p in allow):
        return False
    return not any(fnmatch(path, _normalise(p)) for p in ignore)


def select_files(
    files: Iterable[FileMeta], allow: Sequence[str], ignore: Sequence[str]
) -> list[FileMeta]:
    """The files of a commit to mirror, in path order."""
    return sorted((m for m in files if wanted(m.path, allow, ignore)), key=lambda m: m.path)


def is_followed(revision: str) -> bool:
    """Branches and tags move and are followed; a commit sha names itself for good."""
    return not is_commit_sha(revision)


def advance(history: Sequence[str], commit: str, keep: int) -> tuple[str, ...]:
    """A ref's synced commits, newest first, after syncing ``commit``: at most ``keep``."""
    return (commit, *(c for c in history if c != commit))[:keep]


def retained(refs: Mapping[str, Sequence[str]], pinned: Iterable[str]) -> set[str]:
    """Commits to keep: every one a followed ref still lists, and every pinned commit."""
    return {c for history in refs.values() for c in history} | set(pinned)


def to_retire(
    held: Iterable[str], refs: Mapping[str, Sequence[str]], pinned: Iterable[str]
) -> list[str]:
    """Held commits that no ref lists any more and nobody pinned, sorted."""
    keep = retained(refs, pinned)
    return sorted(c for c in held if c not in keep)


def due_for_removal(retired: Mapping[str, float], now: float, grace_s: float) -> list[str]:
    """Retired commits whose grace period (clients sent there before the manifest changed)
    is over, sorted."""
    return sorted(c for c, at in retired.items() if now - at >= grace_s)
