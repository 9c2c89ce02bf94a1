"""The node manifest: what a mirror node says it holds, parsed strictly.

A node with a ``manifest_url`` publishes there which commits of which repositories it holds; node
sync (``sync``) reads it. Manifest format (JSON, UTF-8, at most ``max_bytes``)::

    {"node": "bj", "generated_at": 1732500000.0,
     "repos": [{"type": "model", "id": "acme/tiny-model",
                "refs": {"main": "<40-hex sha>"},
                "commits": {"<40-hex sha>": {"synced_at": 1732400000.0,
                                             "files": [{"path": "config.json", "size": 123,
                                                        "sha256": "<64 hex>",
                                                        "pieces": {"length": 262144,
                                                                   "sha256": ["<64 hex>"]}}]}}}]}

- ``node``: the node's id as configured in the gateway; a manifest of another node is refused.
- ``generated_at``, ``synced_at``: Unix times (numbers >= 0) of the node's clock.
- ``type``: ``model``, ``dataset`` or ``space``; ``id``: the repository id as in resolve URLs.
- ``refs`` (optional): a ref name (branch, tag, ``refs/pr/N``) -> the node's latest synced
  commit of it.
- ``commits``: a commit sha -> when the node finished syncing it and the files it holds of it
  (``size`` in bytes, ``sha256`` of the content, both lowercase hex).
- ``pieces`` (optional, per file): the sha256 of each ``length``-byte piece of the content, the
  last one shorter; exactly ``ceil(size / length)`` of them. Metalinks pass them on, so that a
  client can tell which source sent a bad piece and fetch it again elsewhere.

Parsing is strict: a wrong type, a missing key, a malformed sha or path, a key given twice or a
repository, commit or file listed twice refuses the whole manifest with a ``ManifestError``
naming the JSON path of the problem (``$.repos[0].commits["1a2b..."].files[2].size``). Unknown
keys are ignored, so nodes may publish more than this.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import get_args

from gateway.hf.catalog import is_commit_sha
from gateway.hf.paths import RepoType, is_repo_id

#: Largest manifest read (``SyncConfig`` has no key for it yet). About 300k files; the parsed
#: form takes several times this in memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

#: (type, repository id)
RepoKey = tuple[RepoType, str]
#: (type, repository id, commit)
CommitKey = tuple[RepoType, str, str]

_SHA256_HEX = 64
_HEX_DIGITS = frozenset("0123456789abcdef")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
_REPO_TYPES: Mapping[str, RepoType] = {name: name for name in get_args(RepoType)}
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (dict, "object"),
    (list, "array"),
    (str, "string"),
    (bool, "boolean"),
    (int, "number"),
    (float, "number"),
)


class ManifestError(Exception):
    """A node manifest that cannot be had or used; the message says where and why."""


# --------------------------------------------------------------------------- holdings


@dataclass(frozen=True, slots=True)
class Pieces:
    #: Bytes per piece; the last piece may be shorter.
    length: int
    #: sha256 of each piece, in order.
    sha256: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CommitHolding:
    #: When the node finished syncing this commit (node's clock).
    synced_at: float
    #: path -> (size, sha256)
    files: Mapping[str, tuple[int, str]]
    #: path -> piece hashes, for the files the node publishes them for
    pieces: Mapping[str, Pieces] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeHoldings:
    node_id: str
    #: (type, repo) -> commit -> holding
    commits: Mapping[RepoKey, Mapping[str, CommitHolding]]
    #: (type, repo) -> ref -> the node's latest synced commit of it
    refs: Mapping[RepoKey, Mapping[str, str]]
    #: When the gateway read the manifest (gateway's clock).
    fetched_at: float
    #: When the node wrote it (node's clock).
    generated_at: float


def repo_label(key: RepoKey) -> str:
    """A repository as messages name it: its id, prefixed by its type unless a model."""
    repo_type, repo_id = key
    return repo_id if repo_type == "model" else f"{repo_type} {repo_id}"


# --------------------------------------------------------------------------- parsing


class _RepeatedKey(dict[str, object]):
    """A JSON object that gave a key twice; reported once its JSON path is known."""

    __slots__ = ("key",)

    def __init__(self, pairs: list[tuple[str, object]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    data = dict(pairs)
    if len(data) == len(pairs):
        return data
    counts = Counter(key for key, _ in pairs)
    return _RepeatedKey(pairs, next(key for key, n in counts.items() if n > 1))


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: object) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "null")


def _entry(where: str, key: str) -> str:
    # Data keys (refs, commits) go in brackets: they may hold dots, slashes or start with a digit.
    return f"{where}[{json.dumps(key)}]"


def _object(value: object, where: str) -> Mapping[str, object]:
    if isinstance(value, _RepeatedKey):
        raise ManifestError(f"manifest {where}: key {value.key!r} appears more than once")
    if not isinstance(value, dict):
        raise ManifestError(f"manifest {where}: expected an object, got {_json_type(value)}")
    return value


def _array(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise ManifestError(f"manifest {where}: expected an array, got {_json_type(value)}")
    return value


def _required(data: Mapping[str, object], name: str, where: str) -> object:
    if name not in data:
        raise ManifestError(f"manifest {where}.{name}: missing")
    return data[name]


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"manifest {where}: expected a non-empty string, got {_show(value)}")
    return value


def _time(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(f"manifest {where}: expected a Unix time, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise ManifestError(f"manifest {where}: expected a finite Unix time >= 0, got {value}")
    return number


def _size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"manifest {where}: expected an integer >= 0, got {_show(value)}")
    return value


def _commit(value: str, where: str) -> str:
    if not is_commit_sha(value):
        raise ManifestError(f"manifest {where}: {_show(value)} is not a 40-hex lowercase commit")
    return value


def _sha256(value: object, where: str) -> str:
    if not (isinstance(value, str) and len(value) == _SHA256_HEX and set(value) <= _HEX_DIGITS):
        raise ManifestError(
            f"manifest {where}: expected 64 lowercase hex digits, got {_show(value)}"
        )
    return value


def _repo_type(value: object, where: str) -> RepoType:
    repo_type = _REPO_TYPES.get(value) if isinstance(value, str) else None
    if repo_type is not None:
        return repo_type
    allowed = ", ".join(_REPO_TYPES)
    raise ManifestError(f"manifest {where}: {_show(value)} is not allowed; allowed: {allowed}")


def _repo_id(value: object, repo_type: RepoType, where: str) -> str:
    repo_id = _string(value, where)
    # An id that no resolve URL can name could never be asked for, and verification puts it
    # into a node URL unencoded.
    if not is_repo_id(repo_type, repo_id):
        raise ManifestError(f"manifest {where}: {_show(value)} is not a valid repository id")
    return repo_id


def _file_path(value: object, where: str) -> str:
    path = _string(value, where)
    if _CONTROL_CHAR.search(path):
        problem = "contains a control character"
    elif "\\" in path:
        problem = "contains a backslash"
    elif path[0] == "/" or path[-1] == "/" or "//" in path:
        problem = "has an empty path segment"
    elif any(part in (".", "..") for part in path.split("/")):
        problem = "has a '.' or '..' segment"
    else:
        return path
    raise ManifestError(f"manifest {where}: {_show(value)} {problem}")


def _pieces(value: object, size: int, where: str) -> Pieces:
    data = _object(value, where)
    length = _size(_required(data, "length", where), f"{where}.length")
    if length == 0:
        raise ManifestError(f"manifest {where}.length: expected an integer > 0, got 0")
    hashes = _array(_required(data, "sha256", where), f"{where}.sha256")
    count = (size + length - 1) // length
    if len(hashes) != count:
        raise ManifestError(
            f"manifest {where}.sha256: {len(hashes)} hashes, but {size} bytes make {count} "
            f"pieces of {length}"
        )
    return Pieces(length, tuple(_sha256(h, f"{where}.sha256[{i}]") for i, h in enumerate(hashes)))


def _commit_holding(value: object, where: str) -> CommitHolding:
    data = _object(value, where)
    synced_at = _time(_required(data, "synced_at", where), f"{where}.synced_at")
    files: dict[str, tuple[int, str]] = {}
    pieces: dict[str, Pieces] = {}
    first_at: dict[str, int] = {}
    listed = _array(_required(data, "files", where), f"{where}.files")
    for i, item in enumerate(listed):
        at = f"{where}.files[{i}]"
        entry = _object(item, at)
        path = _file_path(_required(entry, "path", at), f"{at}.path")
        if path in files:
            raise ManifestError(
                f"manifest {at}.path: {path!r} is listed again (first at files[{first_at[path]}])"
            )
        size = _size(_required(entry, "size", at), f"{at}.size")
        files[path] = (size, _sha256(_required(entry, "sha256", at), f"{at}.sha256"))
        if entry.get("pieces") is not None:
            pieces[path] = _pieces(entry["pieces"], size, f"{at}.pieces")
        first_at[path] = i
    return CommitHolding(synced_at=synced_at, files=files, pieces=pieces)


def parse_manifest(node_id: str, body: bytes, now: float, max_bytes: int) -> NodeHoldings:
    """Read a node's manifest (format in the module docstring); raises ManifestError."""
    if len(body) > max_bytes:
        raise ManifestError(f"manifest: more than {max_bytes} bytes")
    try:
        data = json.loads(
            body.decode("utf-8"), object_pairs_hook=_json_object, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise ManifestError("manifest: body is not UTF-8") from None
    except RecursionError:
        raise ManifestError("manifest: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ManifestError(f"manifest: not valid JSON ({exc})") from None

    top = _object(data, "$")
    named = _string(_required(top, "node", "$"), "$.node")
    if named != node_id:
        raise ManifestError(f"manifest $.node: {named!r} is another node than {node_id!r}")
    generated_at = _time(_required(top, "generated_at", "$"), "$.generated_at")
    commits: dict[RepoKey, Mapping[str, CommitHolding]] = {}
    refs: dict[RepoKey, Mapping[str, str]] = {}
    first_at: dict[RepoKey, int] = {}
    for i, item in enumerate(_array(_required(top, "repos", "$"), "$.repos")):
        at = f"$.repos[{i}]"
        repo = _object(item, at)
        repo_type = _repo_type(_required(repo, "type", at), f"{at}.type")
        key = (repo_type, _repo_id(_required(repo, "id", at), repo_type, f"{at}.id"))
        if key in first_at:
            raise ManifestError(
                f"manifest {at}: {repo_label(key)} is listed again "
                f"(first at $.repos[{first_at[key]}])"
            )
        first_at[key] = i
        if repo.get("refs") is not None:
            refs_at = f"{at}.refs"
            refs[key] = {
                _string(name, _entry(refs_at, name)): _commit(
                    _string(commit, _entry(refs_at, name)), _entry(refs_at, name)
                )
                for name, commit in _object(repo["refs"], refs_at).items()
            }
        commits_at = f"{at}.commits"
        commits[key] = {
            _commit(commit, _entry(commits_at, commit)): _commit_holding(
                holding, _entry(commits_at, commit)
            )
            for commit, holding in _object(_required(repo, "commits", at), commits_at).items()
        }
    return NodeHoldings(
        node_id=node_id, commits=commits, refs=refs, fetched_at=now, generated_at=generated_at
    )
