"""Tests for gateway.hfpath: resolve-path grammar, rejection codes and encoding round trips."""

from __future__ import annotations

from typing import get_args
from urllib.parse import quote, unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.hf.paths import (
    FileRef,
    PathError,
    PathErrorCode,
    RepoType,
    parse_resolve_path,
    resolve_path_for,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_96 = "a" * 96

VALID = [
    pytest.param(
        "/openai/whisper-tiny/resolve/main/config.json",
        FileRef("model", "openai/whisper-tiny", "main", "config.json"),
        id="model-ns-name",
    ),
    pytest.param(
        "/datasets/ns/name/resolve/main/data/train-00000-of-00001.parquet",
        FileRef("dataset", "ns/name", "main", "data/train-00000-of-00001.parquet"),
        id="dataset-ns-name",
    ),
    pytest.param(
        "/spaces/ns/app/resolve/main/app.py",
        FileRef("space", "ns/app", "main", "app.py"),
        id="space-ns-name",
    ),
    pytest.param(
        "/gpt2/resolve/main/config.json",
        FileRef("model", "gpt2", "main", "config.json"),
        id="legacy-model-gpt2",
    ),
    pytest.param(
        "/bert-base-uncased/resolve/main/vocab.txt",
        FileRef("model", "bert-base-uncased", "main", "vocab.txt"),
        id="legacy-model-bert",
    ),
    pytest.param(
        "/datasets/squad/resolve/main/README.md",
        FileRef("dataset", "squad", "main", "README.md"),
        id="legacy-dataset",
    ),
    pytest.param(
        "/models/gpt2/resolve/main/f.bin",
        FileRef("model", "models/gpt2", "main", "f.bin"),
        id="models-is-a-namespace-not-a-prefix",
    ),
    pytest.param(
        "/ns/name/resolve/refs%2Fpr%2F1/model.safetensors",
        FileRef("model", "ns/name", "refs/pr/1", "model.safetensors"),
        id="revision-refs-pr",
    ),
    pytest.param(
        f"/ns/name/resolve/{COMMIT}/model.safetensors",
        FileRef("model", "ns/name", COMMIT, "model.safetensors"),
        id="revision-commit-sha",
    ),
    pytest.param(
        "/ns/name/resolve/v1.0/f",
        FileRef("model", "ns/name", "v1.0", "f"),
        id="revision-tag-with-dot",
    ),
    pytest.param(
        "/ns/name/resolve/main/a%20b/c%23d%3F.json",
        FileRef("model", "ns/name", "main", "a b/c#d?.json"),
        id="filename-space-hash-question",
    ),
    pytest.param(
        "/ns/name/resolve/main/%E4%B8%AD%E6%96%87/%E6%A8%A1%E5%9E%8B.bin",
        FileRef("model", "ns/name", "main", "中文/模型.bin"),
        id="filename-unicode",
    ),
    pytest.param(
        "/ns/name/resolve/main/a/b/c/d.bin",
        FileRef("model", "ns/name", "main", "a/b/c/d.bin"),
        id="filename-nested-dirs",
    ),
    pytest.param(
        "/ns/name/resolve/main/.gitattributes",
        FileRef("model", "ns/name", "main", ".gitattributes"),
        id="filename-dotfile",
    ),
    pytest.param(
        "/ns/name/resolve/main/a..b/...",
        FileRef("model", "ns/name", "main", "a..b/..."),
        id="filename-dots-that-are-not-traversal",
    ),
    pytest.param(
        "/ns/name/resolve/main/a%2Fb.bin",
        FileRef("model", "ns/name", "main", "a/b.bin"),
        id="filename-encoded-slash-is-a-separator",
    ),
    pytest.param(
        "/ns/name/resolve/refs%2fpr%2f1/a%c3%a4.bin",
        FileRef("model", "ns/name", "refs/pr/1", "aä.bin"),
        id="lowercase-hex-escapes",
    ),
    pytest.param(
        "/ns/name/resolve/main/a~b_c-d",
        FileRef("model", "ns/name", "main", "a~b_c-d"),
        id="filename-unreserved-punctuation",
    ),
    pytest.param(
        "/ns/name/resolve/main/a(b)!$&'*+,;=:@",
        FileRef("model", "ns/name", "main", "a(b)!$&'*+,;=:@"),
        id="filename-raw-sub-delims",
    ),
    pytest.param(
        "/my.org/model_v1.5/resolve/main/f",
        FileRef("model", "my.org/model_v1.5", "main", "f"),
        id="repo-id-dots-underscores",
    ),
    pytest.param(
        f"/{REPO_96}/{REPO_96}/resolve/main/f",
        FileRef("model", f"{REPO_96}/{REPO_96}", "main", "f"),
        id="repo-id-96-chars",
    ),
    pytest.param(
        "/ns/resolve/resolve/main/f",
        FileRef("model", "ns/resolve", "main", "f"),
        id="repo-named-resolve",
    ),
    pytest.param(
        "/gpt2/resolve/resolve/a/b",
        FileRef("model", "gpt2/resolve", "a", "b"),
        id="ns-name-reading-wins-over-legacy",
    ),
    pytest.param(
        "/ns/name/re%73olve/main/f",
        FileRef("model", "ns/name", "main", "f"),
        id="encoded-unreserved-in-keyword",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_parses_valid_paths(raw: str, expected: FileRef) -> None:
    assert parse_resolve_path(raw) == expected


CANONICAL = [
    pytest.param(raw, id=param_id)
    for raw, param_id in [
        ("/openai/whisper-tiny/resolve/main/config.json", "model"),
        ("/datasets/ns/name/resolve/main/data/train.parquet", "dataset"),
        ("/spaces/ns/app/resolve/main/app.py", "space"),
        ("/gpt2/resolve/main/config.json", "legacy"),
        ("/ns/name/resolve/refs%2Fpr%2F1/f.bin", "refs-pr"),
        (f"/ns/name/resolve/{COMMIT}/f.bin", "commit"),
        ("/ns/name/resolve/main/a%20b/c%23d%3F.json", "space-hash-question"),
        ("/ns/name/resolve/main/%E4%B8%AD%E6%96%87/%E6%A8%A1%E5%9E%8B.bin", "unicode"),
        ("/ns/name/resolve/v%2B1/%25%20a.bin", "encoded-plus-percent-space"),
    ]
]


@pytest.mark.parametrize("raw", CANONICAL)
def test_canonical_paths_round_trip(raw: str) -> None:
    ref = parse_resolve_path(raw)
    assert ref is not None
    assert resolve_path_for(ref) == raw


NOT_RESOLVE = [
    pytest.param("", id="empty"),
    pytest.param("/", id="root"),
    pytest.param("/healthz", id="healthz"),
    pytest.param("/healthz/", id="healthz-trailing-slash"),
    pytest.param("/api/models/x", id="api"),
    pytest.param("/a/b/c/d", id="four-segments"),
    pytest.param("/ns/name/blob/main/f", id="blob-url"),
    pytest.param("//evil.com/x", id="scheme-relative"),
    pytest.param("relative/resolve/main/f", id="no-leading-slash"),
    pytest.param("/gpt2/resolve", id="legacy-without-revision"),
    pytest.param("/gpt2/resolve/main", id="legacy-without-filename"),
    pytest.param("/ns/name/resolve/main", id="ns-name-without-filename"),
    pytest.param("/datasets", id="bare-prefix"),
    pytest.param("/datasets/resolve/main/f", id="prefix-without-repo"),
    pytest.param("/kernels/ns/k/resolve/main/f", id="kernels-prefix-unsupported"),
    pytest.param("/a/b/c/resolve/main/f", id="three-segment-repo"),
]


@pytest.mark.parametrize("raw", NOT_RESOLVE)
def test_returns_none_for_other_paths(raw: str) -> None:
    assert parse_resolve_path(raw) is None


ERRORS = [
    # path_too_long
    pytest.param("/gpt2/resolve/main/" + "a" * 5000, "path_too_long", id="over-default-limit"),
    pytest.param("/x/" + "a" * 5000, "path_too_long", id="over-limit-even-if-not-resolve"),
    # invalid_character
    pytest.param("/gpt2/resolve/main/ä.bin", "invalid_character", id="raw-non-ascii"),
    pytest.param("/gpt2/resolve/main/a b", "invalid_character", id="raw-space"),
    pytest.param("/healthz\udcff", "invalid_character", id="raw-surrogate-escape"),
    # control_character
    pytest.param("/gpt2/resolve/main/a%00b", "control_character", id="encoded-nul"),
    pytest.param("/gpt2/resolve/main/a%0d%0aSet-Cookie:x", "control_character", id="encoded-crlf"),
    pytest.param("/gpt2/resolve/main/a%7F", "control_character", id="encoded-del"),
    pytest.param("/gpt2/resolve/main%09/f", "control_character", id="encoded-tab-revision"),
    pytest.param("/gpt2/resolve/main/a\r\nb", "control_character", id="raw-crlf"),
    pytest.param("/gpt2/resolve/main/a\x00", "control_character", id="raw-nul"),
    pytest.param("/healthz%00", "control_character", id="encoded-nul-not-resolve"),
    # invalid_percent_encoding
    pytest.param("/gpt2/resolve/main/%ZZ", "invalid_percent_encoding", id="non-hex-escape"),
    pytest.param("/gpt2/resolve/main/a%", "invalid_percent_encoding", id="trailing-percent"),
    pytest.param("/gpt2/resolve/main/a%4", "invalid_percent_encoding", id="one-hex-digit"),
    pytest.param("/gpt2/resolve/ma%G1in/f", "invalid_percent_encoding", id="bad-in-revision"),
    pytest.param("/api/%zz", "invalid_percent_encoding", id="bad-escape-not-resolve"),
    # invalid_utf8
    pytest.param("/gpt2/resolve/main/%C3", "invalid_utf8", id="truncated-sequence"),
    pytest.param("/gpt2/resolve/main/%FF", "invalid_utf8", id="invalid-byte"),
    pytest.param("/gpt2/resolve/main/%C0%AF", "invalid_utf8", id="overlong-slash"),
    pytest.param("/gpt2/resolve/main/%ED%A0%80", "invalid_utf8", id="encoded-surrogate"),
    # path_traversal
    pytest.param("/ns/name/resolve/main/../x", "path_traversal", id="raw-dotdot"),
    pytest.param("/ns/name/resolve/main/a/./b", "path_traversal", id="raw-dot"),
    pytest.param("/ns/name/resolve/main/%2e%2e/x", "path_traversal", id="encoded-dotdot"),
    pytest.param("/ns/name/resolve/main/%2E%2e%2Fetc", "path_traversal", id="encoded-dotdot-slash"),
    pytest.param("/ns/name/resolve/main/a%2F..", "path_traversal", id="encoded-slash-dotdot"),
    pytest.param("/ns/name/resolve/refs%2F..%2Fx/f", "path_traversal", id="dotdot-in-revision"),
    pytest.param("/ns/name/resolve/../f", "path_traversal", id="revision-is-dotdot"),
    pytest.param("/api/../admin", "path_traversal", id="dotdot-not-resolve"),
    # empty_path_segment
    pytest.param("/gpt2/resolve/main/", "empty_path_segment", id="trailing-slash"),
    pytest.param("/gpt2/resolve/main/a//b", "empty_path_segment", id="double-slash"),
    pytest.param("/gpt2/resolve/main//a", "empty_path_segment", id="leading-slash"),
    pytest.param("/gpt2/resolve/main/%2Fetc", "empty_path_segment", id="encoded-leading-slash"),
    pytest.param("/gpt2/resolve/main/a%2F%2Fb", "empty_path_segment", id="encoded-double-slash"),
    # invalid_repo_id
    pytest.param("/-x/resolve/main/f", "invalid_repo_id", id="leading-dash"),
    pytest.param("/x-/resolve/main/f", "invalid_repo_id", id="trailing-dash"),
    pytest.param("/.x/resolve/main/f", "invalid_repo_id", id="leading-dot"),
    pytest.param("/ns/x./resolve/main/f", "invalid_repo_id", id="trailing-dot-name"),
    pytest.param("/a--b/resolve/main/f", "invalid_repo_id", id="double-dash"),
    pytest.param("/ns/a..b/resolve/main/f", "invalid_repo_id", id="double-dot"),
    pytest.param(f"/{'a' * 97}/resolve/main/f", "invalid_repo_id", id="97-chars"),
    pytest.param(f"/ns/{'a' * 97}/resolve/main/f", "invalid_repo_id", id="97-chars-name"),
    pytest.param("/ns/n%C3%A4me/resolve/main/f", "invalid_repo_id", id="non-ascii"),
    pytest.param("/ns/na+me/resolve/main/f", "invalid_repo_id", id="plus-sign"),
    pytest.param("/ns%2Fname/resolve/main/f", "invalid_repo_id", id="encoded-slash"),
    pytest.param("//resolve/main/f", "invalid_repo_id", id="empty-legacy"),
    pytest.param("/datasets//name/resolve/main/f", "invalid_repo_id", id="empty-namespace"),
    # invalid_revision
    pytest.param("/gpt2/resolve//f", "invalid_revision", id="empty"),
    pytest.param(f"/gpt2/resolve/{'a' * 256}/f", "invalid_revision", id="256-chars"),
    pytest.param("/gpt2/resolve/my%20branch/f", "invalid_revision", id="space"),
    pytest.param("/gpt2/resolve/v1..2/f", "invalid_revision", id="double-dot"),
    pytest.param("/gpt2/resolve/a%5Cb/f", "invalid_revision", id="backslash"),
    pytest.param("/gpt2/resolve/%2Fmain/f", "invalid_revision", id="leading-slash"),
    pytest.param("/gpt2/resolve/main%2F/f", "invalid_revision", id="trailing-slash"),
    pytest.param("/gpt2/resolve/a%2F%2Fb/f", "invalid_revision", id="empty-part"),
    # invalid_filename
    pytest.param("/gpt2/resolve/main/a%5Cb", "invalid_filename", id="encoded-backslash"),
    pytest.param("/gpt2/resolve/main/a\\b", "invalid_filename", id="raw-backslash"),
    pytest.param("/gpt2/resolve/main/..%5Cx", "invalid_filename", id="windows-traversal"),
]


@pytest.mark.parametrize(("raw", "code"), ERRORS)
def test_rejects_malformed_paths(raw: str, code: str) -> None:
    with pytest.raises(PathError) as caught:
        parse_resolve_path(raw)
    assert caught.value.code == code
    assert caught.value.status == (414 if code == "path_too_long" else 400)


def test_every_error_code_has_a_case() -> None:
    covered = {param.values[1] for param in ERRORS}
    assert covered == set(get_args(PathErrorCode))


def test_length_limit_is_inclusive() -> None:
    raw = "/gpt2/resolve/main/" + "a" * 81
    assert len(raw) == 100
    assert parse_resolve_path(raw, max_bytes=100) is not None
    with pytest.raises(PathError) as caught:
        parse_resolve_path(raw, max_bytes=99)
    assert caught.value.status == 414


def test_length_is_checked_before_characters() -> None:
    with pytest.raises(PathError) as caught:
        parse_resolve_path("/\x00" + "a" * 200, max_bytes=100)
    assert caught.value.code == "path_too_long"


def test_error_message_is_bounded_and_shows_control_characters() -> None:
    raw = "/gpt2/resolve/main/" + "%0d%0a" * 300
    with pytest.raises(PathError) as caught:
        parse_resolve_path(raw)
    exc = caught.value
    assert str(exc) == exc.message
    assert "\r" not in exc.message
    assert "\n" not in exc.message
    assert "\\r\\n" in exc.message
    assert len(exc.message) < 400


def test_error_message_names_the_offending_part() -> None:
    with pytest.raises(PathError) as caught:
        parse_resolve_path("/ns/a--b/resolve/main/f")
    assert "'ns/a--b'" in str(caught.value)


def test_path_error_constructor_and_repr() -> None:
    exc = PathError(400, "invalid_revision", "revision '' must be 1-255 characters long")
    assert (exc.status, exc.code, exc.message) == (
        400,
        "invalid_revision",
        "revision '' must be 1-255 characters long",
    )
    assert str(exc) == exc.message
    assert "invalid_revision" in repr(exc)


@pytest.mark.parametrize(
    ("repo_type", "prefix"),
    [
        pytest.param("model", "", id="model"),
        pytest.param("dataset", "datasets/", id="dataset"),
        pytest.param("space", "spaces/", id="space"),
    ],
)
def test_type_prefix(repo_type: RepoType, prefix: str) -> None:
    assert FileRef(repo_type, "ns/name", "main", "f").type_prefix == prefix


@pytest.mark.parametrize(
    ("revision", "filename", "revision_encoded", "filename_encoded"),
    [
        pytest.param("main", "config.json", "main", "config.json", id="plain"),
        pytest.param("refs/pr/1", "a/b.bin", "refs%2Fpr%2F1", "a/b.bin", id="slashes"),
        pytest.param("v 1", "a b/c#d?.json", "v%201", "a%20b/c%23d%3F.json", id="reserved"),
        pytest.param(
            "main",
            "中文/模型.bin",
            "main",
            "%E4%B8%AD%E6%96%87/%E6%A8%A1%E5%9E%8B.bin",
            id="unicode",
        ),
    ],
)
def test_encoded_properties(
    revision: str, filename: str, revision_encoded: str, filename_encoded: str
) -> None:
    ref = FileRef("model", "ns/name", revision, filename)
    assert ref.revision_encoded == revision_encoded
    assert ref.filename_encoded == filename_encoded


def test_resolve_path_for_dataset() -> None:
    ref = FileRef("dataset", "ns/name", "refs/convert/parquet", "a b.parquet")
    expected = "/datasets/ns/name/resolve/refs%2Fconvert%2Fparquet/a%20b.parquet"
    assert resolve_path_for(ref) == expected


def test_file_ref_is_immutable_and_slotted() -> None:
    ref = FileRef("model", "gpt2", "main", "f")
    with pytest.raises(AttributeError):
        ref.revision = "other"  # type: ignore[misc]
    assert not hasattr(ref, "__dict__")


@pytest.mark.parametrize(
    "revision",
    [pytest.param(COMMIT, id="commit"), pytest.param("refs/pr/1", id="refs-pr")],
)
def test_with_revision(revision: str) -> None:
    ref = FileRef("dataset", "ns/name", "main", "a b.bin")
    pinned = ref.with_revision(revision)
    assert pinned == FileRef("dataset", "ns/name", revision, "a b.bin")
    assert ref.revision == "main"


@pytest.mark.parametrize(
    ("revision", "code"),
    [
        pytest.param("", "invalid_revision", id="empty"),
        pytest.param("a b", "invalid_revision", id="space"),
        pytest.param("v1..2", "invalid_revision", id="double-dot"),
        pytest.param("/main", "invalid_revision", id="leading-slash"),
        pytest.param("main\r\n", "control_character", id="crlf"),
        pytest.param("refs/./x", "path_traversal", id="dot-part"),
    ],
)
def test_with_revision_rejects_bad_revisions(revision: str, code: str) -> None:
    ref = FileRef("model", "gpt2", "main", "f")
    with pytest.raises(PathError) as caught:
        ref.with_revision(revision)
    assert caught.value.code == code


# --- properties -------------------------------------------------------------------------------

_REPO_SEGMENTS = st.from_regex(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,20}[A-Za-z0-9_])?", fullmatch=True)
_VALID_SEGMENTS = _REPO_SEGMENTS.filter(lambda s: "--" not in s and ".." not in s)
_REPO_IDS = st.lists(_VALID_SEGMENTS, min_size=1, max_size=2).map("/".join)
_REVISIONS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["main", "refs/pr/1", "refs/convert/parquet", "v1.0", COMMIT]),
    st.lists(st.text(max_size=8), min_size=1, max_size=4).map("/".join),
)
_CONTROL_CHARS = {chr(c) for c in range(0x20)} | {"\x7f"}


def _breaks_rules(revision: str, filename: str) -> bool:
    """An independent statement of the revision and filename rules."""
    revision_parts = revision.split("/")
    filename_parts = filename.split("/")
    return (
        not 1 <= len(revision) <= 255
        or not _CONTROL_CHARS.isdisjoint(revision + filename)
        or " " in revision
        or ".." in revision
        or "\\" in revision + filename
        or "" in revision_parts + filename_parts
        or "." in revision_parts + filename_parts
        or ".." in filename_parts
    )


@given(
    repo_type=st.sampled_from(get_args(RepoType)),
    repo_id=_REPO_IDS,
    revision=_REVISIONS,
    filename_parts=st.lists(st.text(max_size=12), min_size=1, max_size=4),
)
def test_client_built_urls_parse_back(
    repo_type: RepoType, repo_id: str, revision: str, filename_parts: list[str]
) -> None:
    # Inputs the grammar itself cannot tell apart: a model namespace that reads as a type
    # prefix, and a legacy repo whose revision is the literal `resolve`.
    assume(repo_type != "model" or repo_id.partition("/")[0] not in {"datasets", "spaces"})
    assume("/" in repo_id or revision != "resolve")
    filename = "/".join(filename_parts)
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    # Built exactly the way huggingface_hub builds a resolve URL.
    raw = f"/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    try:
        ref = parse_resolve_path(raw, max_bytes=1 << 20)
    except PathError as exc:
        assert _breaks_rules(revision, filename), exc
        return
    assert not _breaks_rules(revision, filename)
    assert ref == FileRef(repo_type, repo_id, revision, filename)
    assert resolve_path_for(ref) == raw


_TOKENS = [
    "/", "/", "/", "%", "%2F", "%2f", "%2E", "%2e", ".", "..", "resolve", "datasets", "spaces",
    "models", "main", "gpt2", "ns", "a", "-", "--", "%00", "%0D", "%0a", "%7F", "%C3", "%A4",
    "%FF", "%E4%B8%AD", "\\", "%5C", "%20", " ", "~", "\r", "\n", "ä", "%Z", "%25", "#", "?",
]  # fmt: skip
_TOKEN_TEXT = st.lists(st.sampled_from(_TOKENS), max_size=8).map("".join)
_QUOTED_TEXT = st.text(max_size=10).map(lambda s: quote(s, safe=""))
_RAW_PATHS = st.one_of(
    st.text(max_size=60),
    st.characters().map(lambda c: f"/gpt2/resolve/main/{c}"),
    _TOKEN_TEXT,
    st.builds(
        "{}{}/resolve/{}/{}".format,
        st.sampled_from(["/", "/datasets/", "/spaces/", "/models/", ""]),
        st.one_of(_REPO_IDS, _TOKEN_TEXT),
        _TOKEN_TEXT,
        _TOKEN_TEXT,
    ),
    st.builds(
        "/ns/name/resolve/{}/{}".format,
        st.one_of(_QUOTED_TEXT, _TOKEN_TEXT),
        st.lists(st.one_of(_QUOTED_TEXT, _TOKEN_TEXT), min_size=1, max_size=3).map("/".join),
    ),
)


@given(raw=_RAW_PATHS)
def test_arbitrary_paths_only_raise_path_error(raw: str) -> None:
    try:
        ref = parse_resolve_path(raw, max_bytes=160)
    except PathError as exc:
        assert exc.code in get_args(PathErrorCode)
        assert exc.status == (414 if exc.code == "path_too_long" else 400)
        return
    if ref is None:
        return
    for encoded in (ref.revision_encoded, ref.filename_encoded):
        decoded = unquote(encoded)
        assert {".", ".."}.isdisjoint(decoded.split("/"))
        assert {".", ".."}.isdisjoint(encoded.split("/"))
        for forbidden in ("\r", "\n", "\x00"):
            assert forbidden not in encoded
            assert forbidden not in decoded
        assert encoded.isascii()
    # Same ambiguity as above: a legacy repo at revision `resolve` reads back as `ns/name`.
    if "/" in ref.repo_id or ref.revision != "resolve":
        assert parse_resolve_path(resolve_path_for(ref)) == ref
