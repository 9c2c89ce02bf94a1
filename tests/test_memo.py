"""Remembered answers on the request path: bounded, and equal to a fresh computation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import hfpath, targets
from gateway.clientip import ClientIPResolver, ForwardingHeaders
from gateway.config import DEFAULT_URL_TEMPLATE, ClientIPConfig, GatewayConfig
from gateway.geo import DatabaseInfo, IPAddress, Location
from gateway.hfpath import FileRef, PathError, parse_resolve_path, parse_resolve_path_remembered
from gateway.memo import BoundedMemo
from gateway.policy import NodeIndex
from gateway.router import Placement, Router

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_bounded_memo_drops_the_oldest_insert_when_full() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(3)
    for number, key in enumerate("abcd"):
        memo.put(key, number)
    assert len(memo) == 3
    assert memo.get("a") is None
    assert [memo.get(key) for key in "bcd"] == [1, 2, 3]
    memo.put("b", 10)  # replacing an entry evicts nothing
    assert len(memo) == 3 and memo.get("b") == 10 and memo.get("c") == 2


def test_get_or_make_makes_only_what_is_missing() -> None:
    memo: BoundedMemo[str, str] = BoundedMemo(2)
    made: list[str] = []

    def make(value: str) -> str:
        made.append(value)
        return value

    assert memo.get_or_make("a", lambda: make("A")) == "A"
    assert memo.get_or_make("a", lambda: make("other")) == "A"
    assert made == ["A"]


def test_bounded_memo_refuses_a_useless_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BoundedMemo(0)


@pytest.mark.parametrize(
    "raw",
    [
        "/org/model/resolve/main/config.json",
        "/datasets/org/data/resolve/refs%2Fpr%2F1/train/part-0.parquet",
        "/gpt2/resolve/main/model.safetensors",
        "/org/model/tree/main",
    ],
)
def test_a_remembered_parse_equals_a_fresh_one(raw: str) -> None:
    assert parse_resolve_path_remembered(raw, 4096) == parse_resolve_path(raw, 4096)
    assert parse_resolve_path_remembered(raw, 4096) == parse_resolve_path(raw, 4096)


def test_the_path_limit_is_part_of_what_is_remembered() -> None:
    raw = "/org/model/resolve/main/" + "a" * 100
    assert parse_resolve_path_remembered(raw, 4096) is not None
    # A reload with a smaller limit must not be answered from the earlier parse.
    with pytest.raises(PathError) as caught:
        parse_resolve_path_remembered(raw, 64)
    assert caught.value.code == "path_too_long"


def test_a_malformed_path_is_rejected_every_time() -> None:
    for _ in range(2):
        with pytest.raises(PathError) as caught:
            parse_resolve_path_remembered("/org/model/resolve/main/%zz", 4096)
        assert caught.value.code == "invalid_percent_encoding"


@pytest.mark.parametrize("revision", [COMMIT, "main", "v1.0", "refs/pr/7"])
def test_with_revision_takes_commits_by_shape_and_checks_the_rest(revision: str) -> None:
    ref = FileRef("model", "org/model", "main", "a/b.bin")
    moved = ref.with_revision(revision)
    assert moved == FileRef("model", "org/model", revision, "a/b.bin")


@pytest.mark.parametrize("revision", ["", "a..b", "x" * 256, "/main", COMMIT.upper() + "/.."])
def test_with_revision_still_refuses_bad_revisions(revision: str) -> None:
    with pytest.raises(PathError):
        FileRef("model", "org/model", "main", "a.bin").with_revision(revision)


@settings(max_examples=200, deadline=None)
@given(
    repo_type=st.sampled_from(["model", "dataset", "space"]),
    revision=st.sampled_from([COMMIT, "main", "refs/pr/1", "v 1", "ü"]),
    filename=st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1
    ),
)
def test_the_remembered_default_url_equals_the_template(
    repo_type: hfpath.RepoType, revision: str, filename: str
) -> None:
    ref = FileRef(repo_type, "org/model", revision, filename)
    expected = DEFAULT_URL_TEMPLATE.format(
        base="https://node.example",
        type_prefix=ref.type_prefix,
        repo_type=ref.repo_type,
        repo=ref.repo_id,
        revision=ref.revision_encoded,
        path=ref.filename_encoded,
    )
    for _ in range(2):
        url = targets.fill_template(DEFAULT_URL_TEMPLATE, "https://node.example", ref)
        assert url == expected


TRUSTED = ClientIPConfig(
    trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
    forwarded_header="x-forwarded-for",
    cdn_client_ip_header=None,
    cdn_country_header=None,
)

peers = st.sampled_from(["10.0.0.1", "198.51.100.4", "::ffff:10.0.0.2", None, "bogus"])
chains = st.lists(
    st.sampled_from(["203.0.113.9", "10.0.0.3", "2001:db8::1", "unknown", " 1.2.3.4:80"]),
    max_size=4,
).map(", ".join)


@settings(max_examples=300, deadline=None)
@given(peer=peers, lines=st.lists(chains, max_size=2))
def test_a_remembered_placement_equals_a_fresh_one(peer: str | None, lines: list[str]) -> None:
    router = placing_router()
    headers = ForwardingHeaders(forwarded=tuple(lines))
    client = router.resolver.resolve(peer, headers)
    location, from_cdn_only = router.locate(client)
    fresh = Placement(client, location, from_cdn_only, NodeIndex(()).cell(location))
    assert router.place(peer, headers) == fresh
    assert router.place(peer, headers) == fresh


def placing_router() -> Router:
    """A router trusting 10.0.0.0/8, whose locator places every address in Beijing."""
    beijing = Location("CN", "AS", 39.9, 116.4, None, None)
    return Router(GatewayConfig(client_ip=TRUSTED), EverywhereLocator(beijing))


class EverywhereLocator:
    databases: tuple[DatabaseInfo, ...] = ()

    def __init__(self, location: Location) -> None:
        self.location = location

    def locate(self, ip: IPAddress) -> Location:
        return self.location

    def close(self) -> None:
        pass


def test_huge_headers_are_resolved_but_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    router = placing_router()
    calls = []
    real = ClientIPResolver.resolve

    def counted(self: ClientIPResolver, peer: str | None, headers: ForwardingHeaders):  # type: ignore[no-untyped-def]
        calls.append(peer)
        return real(self, peer, headers)

    monkeypatch.setattr(ClientIPResolver, "resolve", counted)
    small = ForwardingHeaders(forwarded=("203.0.113.9",))
    # Only the right-most entry is read, but the header is long: not worth remembering.
    huge = ForwardingHeaders(forwarded=(", ".join(["192.0.2.1"] * 100 + ["198.51.100.1"]),))
    for _ in range(3):
        assert str(router.place("10.0.0.1", small).client.ip) == "203.0.113.9"
        assert str(router.place("10.0.0.1", huge).client.ip) == "198.51.100.1"
    # The small chain was worked out once; the huge one every time.
    assert len(calls) == 1 + 3
