"""Moving commits between staging and the published tree, atomically, and removing them.

A commit is downloaded into its staging directory and published with one rename of that
directory into ``{prefix}{repo}/resolve/{commit}``: the web server sees all of it or none of
it. Both live under the node's root, so the rename never crosses a file system.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gateway.hf.paths import RepoType
from gateway.node.store import NodeTree


def _merge_into(source: Path, target: Path) -> None:
    """Move every file of ``source`` that ``target`` lacks into it, then drop ``source``."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / path.relative_to(source)
        if not destination.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            path.replace(destination)
    shutil.rmtree(source)


def stage(tree: NodeTree, repo_type: RepoType, repo_id: str, commit: str) -> Path:
    """The staging directory of ``commit``, holding whatever of it is already on disk.

    A published directory without a sound record (a run stopped between publishing and
    recording, or a file quarantined by verify) goes back to staging: it is not in the
    manifest, and its files are checked again like any staged file.
    """
    staging = tree.staging_dir(repo_type, repo_id, commit)
    published = tree.commit_dir(repo_type, repo_id, commit)
    if published.is_dir():
        if staging.exists():
            _merge_into(published, staging)
        else:
            staging.parent.mkdir(parents=True, exist_ok=True)
            published.rename(staging)
        _remove_empty_parents(published.parent, tree.root)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def drop_extra_files(staging: Path, keep: set[str]) -> None:
    """Remove staged files the commit no longer wants (patterns changed since)."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        if path.relative_to(staging).as_posix() not in keep:
            path.unlink()


def share(source: Path, target: Path) -> bool:
    """Hard-link an identical published blob into staging; False when it cannot be."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        target.unlink()
        os.link(source, target)
    except OSError:
        return False
    return True


def publish(tree: NodeTree, repo_type: RepoType, repo_id: str, commit: str) -> Path:
    """Move the staged commit into the served tree in one rename."""
    staging = tree.staging_dir(repo_type, repo_id, commit)
    published = tree.commit_dir(repo_type, repo_id, commit)
    published.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, published)
    _remove_empty_parents(staging.parent, tree.state)
    return published


def discard_partials(tree: NodeTree, repo_type: RepoType, repo_id: str, commit: str) -> None:
    """Drop what is left of a published commit's downloads (empty directories, as a rule)."""
    partial = tree.partial_dir(repo_type, repo_id, commit)
    shutil.rmtree(partial, ignore_errors=True)
    _remove_empty_parents(partial.parent, tree.state)


def remove(tree: NodeTree, repo_type: RepoType, repo_id: str, commit: str) -> None:
    """Delete a published commit (its hard-linked blobs live on in other commits)."""
    published = tree.commit_dir(repo_type, repo_id, commit)
    if published.exists():
        shutil.rmtree(published)
    _remove_empty_parents(published.parent, tree.root)


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): the rest above stays too
            return
        directory = directory.parent
