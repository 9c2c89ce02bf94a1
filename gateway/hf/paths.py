"""Parse and validate raw Hugging Face resolve paths into canonical file references.

Grammar: ``/{prefix}{repo_id}/resolve/{revision}/{filename}``, read from the percent-encoded path
as received (query string already removed). Pure and allocation-light: it runs on every request.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple
from urllib.parse import quote, unquote_to_bytes

from gateway.lru import LRUCache

RepoType = Literal["model", "dataset", "space"]
PathErrorCode = Literal[
    "path_too_long",
    "invalid_percent_encoding",
    "invalid_utf8",
    "invalid_character",
    "control_character",
    "path_traversal",
    "empty_path_segment",
    "invalid_repo_id",
    "invalid_revision",
    "invalid_filename",
]

# `models` is deliberately absent: upstream model URLs carry no prefix, so a leading `models`
# segment is an ordinary namespace.
_PREFIX_TYPES: dict[str, RepoType] = {"datasets": "dataset", "spaces": "space"}
_TYPE_PREFIXES: dict[RepoType, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ECHO_LIMIT = 100
_MAX_REPO_SEGMENT = 96
_MAX_REVISION = 255
_DOT_PARTS = frozenset({".", ".."})
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
# Length and the `.`/`-` end rule live in the pattern; `--` and `..` are cheaper as `in` tests.
_REPO_SEGMENT = re.compile(
    rf"[A-Za-z0-9_](?:[A-Za-z0-9._-]{{0,{_MAX_REPO_SEGMENT - 2}}}[A-Za-z0-9_])?"
)


class PathError(Exception):
    """A malformed request path; carries the HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: PathErrorCode, message: str) -> None:
        # All three go to Exception so the error pickles and reprs faithfully.
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class FileRef(NamedTuple):
    """One file of one repository at one revision; all fields are decoded text.

    A NamedTuple: one is built per request, and a frozen dataclass costs several times
    more to build (and to hash as a dict key).
    """

    repo_type: RepoType
    repo_id: str
    revision: str
    filename: str

    @property
    def type_prefix(self) -> str:
        return _TYPE_PREFIXES[self.repo_type]

    @property
    def revision_encoded(self) -> str:
        # Same encoding as huggingface_hub, so Locations match what clients themselves request.
        return quote(self.revision, safe="")

    @property
    def filename_encoded(self) -> str:
        return quote(self.filename, safe="/")

    def with_revision(self, revision: str) -> FileRef:
        """The same file at ``revision``, validated like a parsed one (raises PathError)."""
        # The new revision usually comes from outside (an upstream header), so it gets the same
        # checks as a parsed one and every FileRef built here keeps the same guarantees. A full
        # commit id (the common case: the catalog pins every request) passes them by its shape.
        if revision == self.revision:
            return self
        if _COMMIT.fullmatch(revision):
            return FileRef(self.repo_type, self.repo_id, revision, self.filename)
        _check_text(revision, f"revision {_echo(revision)}")
        _check_revision(revision)
        return FileRef(self.repo_type, self.repo_id, revision, self.filename)


def parse_resolve_path(raw_path: str, max_bytes: int = 4096) -> FileRef | None:
    """Parse a raw resolve path; None if it is well-formed but not a resolve URL.

    Raises PathError for a malformed path, even one that would not have been a resolve URL.
    """
    # A path that passes the character check is ASCII, so characters and bytes coincide.
    if len(raw_path) > max_bytes:
        raise PathError(
            414,
            "path_too_long",
            f"request path is {len(raw_path)} bytes long; at most {max_bytes} are allowed",
        )
    if not (raw_path.isascii() and raw_path.isprintable()) or " " in raw_path:
        raise _bad_character(raw_path)

    segments = [_decode_segment(raw) for raw in raw_path.split("/")]
    if segments[0] or len(segments) < 2:
        return None

    repo_type: RepoType = "model"
    start = 1
    prefix_type = _PREFIX_TYPES.get(segments[1])
    if prefix_type is not None:
        repo_type = prefix_type
        start = 2

    count = len(segments) - start
    # The `ns/name` reading wins; only a legacy repo at revision `resolve` is misread by it.
    if count >= 5 and segments[start + 2] == "resolve":
        repo_end = start + 2
    elif count >= 4 and segments[start + 1] == "resolve":
        repo_end = start + 1
    else:
        return None

    repo_id = "/".join(segments[start:repo_end])
    for part in segments[start:repo_end]:
        _check_repo_segment(part, repo_id)

    revision = segments[repo_end + 1]
    _check_revision(revision)

    filename = "/".join(segments[repo_end + 2 :])
    if not filename or filename[0] == "/" or filename[-1] == "/" or "//" in filename:
        raise PathError(
            400, "empty_path_segment", f"filename {_echo(filename)} has an empty path segment"
        )
    if "\\" in filename:
        raise PathError(400, "invalid_filename", f"filename {_echo(filename)} contains a backslash")
    return FileRef(repo_type, repo_id, revision, filename)


#: Files whose resolve path is kept: a redirect names up to four (the node and its duplicates),
#: and percent-encoding them anew is a fifth of a redirect's cost. At most a few MiB.
RESOLVE_PATHS_KEPT = 16_384
_resolve_paths: LRUCache[FileRef, str] = LRUCache(RESOLVE_PATHS_KEPT)


def resolve_path_for(ref: FileRef) -> str:
    """The canonical raw resolve path of ``ref``; parsing it yields ``ref`` again.

    The one exception is a legacy repo at revision ``resolve`` with a nested filename, which the
    grammar cannot tell apart from an ``ns/name`` repo.
    """
    path = _resolve_paths.get(ref)
    if path is None:
        path = _resolve_paths.put(
            ref,
            f"/{ref.type_prefix}{ref.repo_id}/resolve/{ref.revision_encoded}/{ref.filename_encoded}",
        )
    return path


def is_repo_id(repo_type: RepoType, repo_id: str) -> bool:
    """Whether a resolve URL can name ``repo_id``: a round trip through the grammar."""
    probe = FileRef(repo_type, repo_id, "main", "f")
    try:
        return parse_resolve_path(resolve_path_for(probe)) == probe
    except PathError:
        return False


def _echo(text: str) -> str:
    # repr() makes control characters visible; truncation keeps hostile input out of logs.
    if len(text) <= _ECHO_LIMIT:
        return repr(text)
    return f"{text[:_ECHO_LIMIT]!r}..."


def _bad_character(raw_path: str) -> PathError:
    offset, char = next((i, c) for i, c in enumerate(raw_path) if not ("\x21" <= c <= "\x7e"))
    if _CONTROL_CHAR.match(char):
        return PathError(
            400,
            "control_character",
            f"request path {_echo(raw_path)} has control character {char!r} at offset {offset}",
        )
    return PathError(
        400,
        "invalid_character",
        f"request path {_echo(raw_path)} contains {char!r} at offset {offset}; "
        "only printable ASCII is allowed, everything else must be percent-encoded",
    )


def _decode_segment(raw: str) -> str:
    if "%" not in raw:
        # Raw text already passed the printable-ASCII check and cannot hold a `/`.
        if raw in _DOT_PARTS:
            raise _traversal(f"path segment {raw!r}")
        return raw
    if _BAD_ESCAPE.search(raw):
        raise PathError(
            400,
            "invalid_percent_encoding",
            f"path segment {_echo(raw)} has a '%' not followed by two hex digits",
        )
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(
            400, "invalid_utf8", f"path segment {_echo(raw)} does not decode to valid UTF-8"
        ) from None
    _check_text(text, f"path segment {_echo(raw)} (decoded {_echo(text)})")
    return text


def _check_text(text: str, label: str) -> None:
    """Reject control characters and `.`/`..` parts, wherever in the path they appear."""
    control = _CONTROL_CHAR.search(text)
    if control is not None:
        raise PathError(
            400, "control_character", f"{label} contains control character {control.group()!r}"
        )
    # An encoded %2F becomes a separator once a mirror decodes it, so its parts count too.
    if "." in text and (text in _DOT_PARTS or not _DOT_PARTS.isdisjoint(text.split("/"))):
        raise _traversal(label)


def _traversal(label: str) -> PathError:
    return PathError(400, "path_traversal", f"{label} contains a '.' or '..' part")


def _check_repo_segment(part: str, repo_id: str) -> None:
    if _REPO_SEGMENT.fullmatch(part) is None or "--" in part or ".." in part:
        raise PathError(
            400,
            "invalid_repo_id",
            f"repository id {_echo(repo_id)} is invalid: each part needs 1-{_MAX_REPO_SEGMENT} "
            "of A-Z a-z 0-9 . _ -, must not start or end with '.' or '-', "
            "and must not contain '--' or '..'",
        )


def _check_revision(revision: str) -> None:
    if not 0 < len(revision) <= _MAX_REVISION:
        problem = f"must be 1-{_MAX_REVISION} characters long"
    elif " " in revision:
        problem = "contains a space"
    elif "\\" in revision:
        problem = "contains a backslash"
    elif ".." in revision:
        problem = "contains '..'"
    elif revision[0] == "/" or revision[-1] == "/" or "//" in revision:
        problem = "has an empty '/'-separated part"
    else:
        return
    raise PathError(400, "invalid_revision", f"revision {_echo(revision)} {problem}")
