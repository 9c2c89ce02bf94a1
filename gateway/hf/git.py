"""Git over HTTP on a Hugging Face endpoint: the request paths, and the git-lfs batch API.

``git clone {endpoint}/{prefix}{repo_id}[.git]`` asks ``GET .../info/refs?service=git-upload-pack``
then ``POST .../git-upload-pack``; git-lfs then asks ``POST {repo}.git/info/lfs/objects/batch``
(JSON: ``{"operation": "download", "objects": [{"oid", "size"}], "ref": {"name"}}``) and
downloads each object from ``actions.download.href`` of the answer. Pure functions over plain
data: the handlers do the I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

from gateway.hf.catalog import FileMeta
from gateway.hf.paths import FileRef, PathError, RepoType, parse_resolve_path

GitEndpoint = Literal["info_refs", "upload_pack", "receive_pack", "lfs_batch"]

LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"
#: How long a batch answer's hrefs are good for, as git-lfs reads it. Node URLs do not expire;
#: the number only keeps git-lfs from asking again in the middle of one checkout.
LFS_EXPIRES_IN_S = 3600

# Longest first: ``/info/lfs/objects/batch`` must not be read as a repo ending in ``/info/lfs``.
_SUFFIXES: tuple[tuple[str, GitEndpoint], ...] = (
    ("/info/lfs/objects/batch", "lfs_batch"),
    ("/info/refs", "info_refs"),
    ("/git-upload-pack", "upload_pack"),
    ("/git-receive-pack", "receive_pack"),
)
_PREFIX_TYPES: dict[str, RepoType] = {"datasets": "dataset", "spaces": "space"}
_TYPE_PREFIXES: dict[RepoType, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The resolve grammar's repo segment (paths._REPO_SEGMENT), unencoded: git clients send repo
# names as they are.
_REPO_SEGMENT = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_OID = re.compile(r"[0-9a-f]{64}")
_MAX_OBJECTS = 10_000


class GitPath(NamedTuple):
    repo_type: RepoType
    repo_id: str
    endpoint: GitEndpoint

    def upstream_path(self) -> str:
        """The path upstream serves this endpoint at, rebuilt from the validated parts."""
        base = f"/{_TYPE_PREFIXES[self.repo_type]}{self.repo_id}.git"
        suffix = next(s for s, endpoint in _SUFFIXES if endpoint == self.endpoint)
        return base + suffix


class LfsError(Exception):
    """A batch request the gateway refuses; the status and message go to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LfsObject(NamedTuple):
    oid: str
    size: int


class LfsBatch(NamedTuple):
    operation: str
    #: The ref git-lfs is checking out, as a revision (``refs/heads/`` stripped); None if unsent.
    ref: str | None
    objects: tuple[LfsObject, ...]


def parse_git_path(raw_path: str) -> GitPath | None:
    """The git endpoint a raw path names; None for any other path, a resolve path included
    (a repository may hold a file named ``info/refs``). Raises PathError for a git path whose
    repository id is malformed."""
    suffix, endpoint = next(((s, e) for s, e in _SUFFIXES if raw_path.endswith(s)), ("", None))
    if endpoint is None or not raw_path.startswith("/"):
        return None
    try:
        if parse_resolve_path(raw_path) is not None:
            return None
    except PathError:
        return None  # the resolve handler words the error
    repo_path = raw_path[1 : -len(suffix)].removesuffix(".git")
    parts = repo_path.split("/")
    repo_type: RepoType = "model"
    if len(parts) > 1 and parts[0] in _PREFIX_TYPES:
        repo_type = _PREFIX_TYPES[parts[0]]
        parts = parts[1:]
    repo_id = "/".join(parts)
    if not 1 <= len(parts) <= 2 or not all(_valid_segment(p) for p in parts):
        raise PathError(
            400,
            "invalid_repo_id",
            f"repository id {repo_id[:100]!r} is invalid: git paths are "
            "/[datasets/|spaces/]{namespace}/{name}[.git]/{info/refs|git-upload-pack|"
            "info/lfs/objects/batch}",
        )
    return GitPath(repo_type, repo_id, endpoint)


def _valid_segment(part: str) -> bool:
    return _REPO_SEGMENT.fullmatch(part) is not None and "--" not in part and ".." not in part


def parse_batch(body: bytes) -> LfsBatch:
    """A git-lfs batch request; raises ``LfsError`` (422) naming what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise LfsError(422, "the batch request is not JSON") from None
    if not isinstance(payload, dict):
        raise LfsError(422, "the batch request is not a JSON object")
    operation = payload.get("operation")
    if operation not in ("download", "upload"):
        raise LfsError(422, "operation: expected 'download' or 'upload'")
    objects = payload.get("objects")
    if not isinstance(objects, list) or not 0 < len(objects) <= _MAX_OBJECTS:
        raise LfsError(422, f"objects: expected a list of 1..{_MAX_OBJECTS} objects")
    return LfsBatch(operation, _ref_name(payload.get("ref")), tuple(map(_object, objects)))


def _object(item: Any) -> LfsObject:
    if not isinstance(item, dict):
        raise LfsError(422, "objects[]: expected {'oid': sha256 hex, 'size': bytes}")
    oid, size = item.get("oid"), item.get("size")
    if not isinstance(oid, str) or _OID.fullmatch(oid) is None:
        raise LfsError(422, f"objects[].oid: {str(oid)[:80]!r} is not a sha256 in lowercase hex")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise LfsError(422, f"objects[].size: {str(size)[:40]!r} is not a byte count")
    return LfsObject(oid, size)


def _ref_name(ref: Any) -> str | None:
    if ref is None:
        return None
    name = ref.get("name") if isinstance(ref, dict) else None
    if not isinstance(name, str) or not name:
        raise LfsError(422, "ref.name: expected the name of a ref")
    return name.removeprefix("refs/heads/")


def lfs_paths(files: Mapping[str, FileMeta]) -> dict[LfsObject, str]:
    """Each LFS object of a revision (its sha256 and size), and a path that holds it."""
    return {LfsObject(m.etag, m.size): path for path, m in files.items() if m.lfs}


def file_ref(git: GitPath, revision: str, path: str) -> FileRef:
    return FileRef(git.repo_type, git.repo_id, revision, path)


def batch_answer(hrefs: Iterable[tuple[LfsObject, str]]) -> dict[str, Any]:
    """The batch API's answer: each object downloaded from its href, as is (no auth)."""
    return {
        "transfer": "basic",
        "hash_algo": "sha256",
        "objects": [
            {
                "oid": obj.oid,
                "size": obj.size,
                # Tells git-lfs the href needs no credentials of its own: none are sent to it.
                "authenticated": True,
                "actions": {"download": {"href": href, "expires_in": LFS_EXPIRES_IN_S}},
            }
            for obj, href in hrefs
        ],
    }
