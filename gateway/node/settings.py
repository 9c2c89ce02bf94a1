"""Node configuration: what a mirror node copies from where, as frozen typed objects.

Built from YAML (``config/node.yaml`` documents every key) and command-line overrides. Every
validation error names the key, the bad value and what is allowed, like the gateway's own
config, whose validating helpers this module reuses.
"""

from __future__ import annotations

import os
import socket
import string
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import get_args

from gateway.config import (
    ConfigError,
    _each,
    _float,
    _http_url,
    _int,
    _path,
    _Section,
    _show,
    _str,
    read_yaml,
)
from gateway.hf.paths import FileRef, PathError, RepoType, is_repo_id

NODE_CONFIG_ENV_VAR = "MIRROR_NODE_CONFIG"
DEFAULT_UPSTREAM = "https://huggingface.co"
DEFAULT_REVISION = "main"
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RepoSpec:
    """One repository to mirror and the revisions of it to follow."""

    repo_type: RepoType
    repo_id: str
    #: Branches and tags are followed (each run syncs where they point now); a 40-hex commit
    #: is synced once and kept.
    revisions: tuple[str, ...] = (DEFAULT_REVISION,)
    #: fnmatch patterns as huggingface_hub's ``allow_patterns``; empty: every file.
    allow_patterns: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    #: Commits kept per followed ref; None: ``NodeSettings.keep``.
    keep: int | None = None


@dataclass(frozen=True, slots=True)
class NodeSettings:
    #: The node's id as configured in the gateway: the manifest's ``node``.
    node_id: str
    #: Directory the web server serves; the node's own state lives in ``{root}/.mirror-node``.
    root: Path
    upstream: str = DEFAULT_UPSTREAM
    #: Sent to upstream only (never to a CDN on another host); needed for gated repositories.
    token: str | None = None
    repos: tuple[RepoSpec, ...] = ()
    #: Files downloaded at once.
    concurrency: int = 4
    #: Total download rate in Mbit/s; None: unlimited.
    bandwidth_mbps: float | None = None
    #: Commits kept per followed ref; older ones leave the manifest, then the disk.
    keep: int = 2
    #: How long a commit dropped from the manifest stays on disk: clients sent there just before
    #: must be able to finish (gateways re-read the manifest every ``sync.interval_s``).
    prune_after_s: float = 3600.0
    #: Attempts per file before it is reported failed (a mismatch or a network error each).
    retries: int = 3
    #: Piece length of the manifest's piece hashes (Metalink clients check each piece).
    piece_bytes: int = 16 * MIB
    #: Connect and per-read timeout of upstream calls.
    timeout_s: float = 60.0


_TOP_KEYS = (*(f.name for f in fields(NodeSettings)), "token_file")
_REPO_KEYS = ("id", "type", "revisions", "allow_patterns", "ignore_patterns", "keep")
_REPO_TYPES: tuple[RepoType, ...] = get_args(RepoType)


def _repo_type(value: object, key: str) -> RepoType:
    for repo_type in _REPO_TYPES:
        if value == repo_type:
            return repo_type
    raise ConfigError(f"{key}: {_show(value)} is not allowed; allowed: {', '.join(_REPO_TYPES)}")


def _repo_id(value: object, key: str, repo_type: RepoType) -> str:
    repo_id = _str(value, key)
    # An id no resolve URL can name could never be served.
    if not is_repo_id(repo_type, repo_id):
        raise ConfigError(f"{key}: {_show(value)} is not a valid repository id (ns/name)")
    return repo_id


def _revision(value: object, key: str) -> str:
    revision = _str(value, key)
    probe = FileRef("model", "a/b", DEFAULT_REVISION, "f")
    try:
        probe.with_revision(revision)
    except PathError as exc:
        raise ConfigError(f"{key}: {exc.message}") from None
    if revision.startswith("refs/pr/"):
        raise ConfigError(f"{key}: {_show(value)}: pull requests are not mirrored")
    return revision


def _node_id(value: object, key: str) -> str:
    node_id = _str(value, key)
    if not set(node_id) <= set(string.ascii_letters + string.digits + "-_."):
        raise ConfigError(f"{key}: {_show(node_id)} may use only letters, digits, - _ .")
    return node_id


def repo_spec(
    repo_type: RepoType, repo_id: str, revisions: tuple[str, ...], key: str = "REPO"
) -> RepoSpec:
    """A repository named on the command line (``REPO[@REVISION]`` split by the caller)."""
    return RepoSpec(
        repo_type=repo_type,
        repo_id=_repo_id(repo_id, key, repo_type),
        revisions=tuple(_revision(r, key) for r in revisions),
    )


def parse_repo_arg(text: str, repo_type: RepoType) -> RepoSpec:
    """``ns/name`` or ``ns/name@revision`` -> a spec; raises ConfigError naming the argument."""
    repo_id, at, revision = text.partition("@")
    return repo_spec(repo_type, repo_id, (revision,) if at else (DEFAULT_REVISION,), text)


def _repo(value: object, key: str) -> RepoSpec:
    s = _Section(value, key, _REPO_KEYS)
    if not s.has("id"):
        raise ConfigError(f"{s.key('id')}: required (the repository id, e.g. acme/tiny-model)")
    repo_type: RepoType = s.get("type", "model", _repo_type)
    revisions = s.get("revisions", (DEFAULT_REVISION,), _each(_revision))
    if not revisions:
        raise ConfigError(f"{s.key('revisions')}: name at least one branch, tag or commit")
    return RepoSpec(
        repo_type=repo_type,
        repo_id=_repo_id(s.raw("id"), s.key("id"), repo_type),
        revisions=revisions,
        allow_patterns=s.get("allow_patterns", (), _each(_str)),
        ignore_patterns=s.get("ignore_patterns", (), _each(_str)),
        keep=s.get("keep", None, _int(1, 1000)),
    )


def _repos(value: object, key: str) -> tuple[RepoSpec, ...]:
    repos = _each(_repo)(value, key)
    seen: dict[tuple[str, str], int] = {}
    for i, repo in enumerate(repos):
        where = seen.setdefault((repo.repo_type, repo.repo_id), i)
        if where != i:
            raise ConfigError(
                f"{key}[{i}].id: {repo.repo_id!r} is listed again (first at [{where}])"
            )
    return repos


def _read_token(path: Path, key: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {os.fspath(path)!r}: {exc.strerror}") from None
    if not token or any(c <= " " or c == "\x7f" for c in token):
        raise ConfigError(f"{key}: {os.fspath(path)!r} must hold one token on one line")
    return token


def settings_from_mapping(data: object) -> NodeSettings:
    """Validate parsed YAML; ``root`` is required (here or through ``with_overrides``)."""
    s = _Section(data, "", _TOP_KEYS)
    d = NodeSettings(node_id="", root=Path())
    if s.has("token") and s.has("token_file"):
        raise ConfigError("token_file: give token or token_file, not both")
    token = s.get("token", None, _str)
    if s.has("token_file"):
        token = _read_token(_path(s.raw("token_file"), "token_file"), "token_file")
    bandwidth = s.get("bandwidth_mbps", None, _float(0.001, 10_000_000.0))
    return NodeSettings(
        node_id=s.get("node_id", "", _node_id),
        root=s.get("root", Path(), _path),
        upstream=s.get("upstream", d.upstream, _http_url),
        token=token,
        repos=s.get("repos", (), _repos),
        concurrency=s.get("concurrency", d.concurrency, _int(1, 256)),
        bandwidth_mbps=bandwidth,
        keep=s.get("keep", d.keep, _int(1, 1000)),
        prune_after_s=s.get("prune_after_s", d.prune_after_s, _float(0.0, 30 * 86400.0)),
        retries=s.get("retries", d.retries, _int(1, 100)),
        piece_bytes=s.get("piece_bytes", d.piece_bytes, _int(64 * 1024, 2**34)),
        timeout_s=s.get("timeout_s", d.timeout_s, _float(0.1, 3600.0)),
    )


def load_node_settings(path: str | os.PathLike[str] | None) -> NodeSettings:
    """Read a node YAML file; None: nothing but defaults (the command line names the rest)."""
    return settings_from_mapping(None if path is None else read_yaml(path))


def finish(settings: NodeSettings) -> NodeSettings:
    """Fill what has a default only at run time, and check what a run needs."""
    if settings.root == Path():
        raise ConfigError("root: required (in the config file or with --root)")
    node_id = settings.node_id or socket.gethostname().split(".")[0]
    try:
        _node_id(node_id, "node_id")
    except ConfigError:
        raise ConfigError(
            f"node_id: the host name {node_id!r} is not a valid node id; set node_id"
        ) from None
    return replace(settings, node_id=node_id)
