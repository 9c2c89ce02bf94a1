"""Request-path caches: bounded, evicting in O(1), keyed by validated values, and equal to a
fresh computation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DEFAULT_URL_TEMPLATE, ClientIPConfig, GatewayConfig
from gateway.geo.clientip import ForwardingHeaders
from gateway.geo.locator import DatabaseInfo, IPAddress, Location
from gateway.hf import paths, targets
from gateway.hf.paths import FileRef, PathError
from gateway.lru import LRUCache
from gateway.routing.ranking import NodeIndex
from gateway.routing.router import Placement, Router

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: LRUCache[str, int] = LRUCache(3)
    for number, key in enumerate("abc"):
        cache.put(key, number)
    assert cache.get("a") == 0  # now the most recently used
    cache.put("d", 3)
    assert cache.get("b") is None
    assert [cache.get(key) for key in "acd"] == [0, 2, 3]
    assert len(cache) == 3


def test_get_or_make_makes_only_what_is_missing() -> None:
    cache: LRUCache[str, str] = LRUCache(2)
    made: list[str] = []

    def make(key: str) -> str:
        made.append(key)
        return key.upper()

    assert [cache.get_or_make(k, lambda k=k: make(k)) for k in "aab"] == ["A", "A", "B"]  # type: ignore[misc]
    assert made == ["a", "b"]


def test_a_cache_refuses_a_useless_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LRUCache(0)


def test_a_full_cache_stays_bounded_under_endless_new_keys() -> None:
    cache: LRUCache[int, int] = LRUCache(1000)
    for key in range(200_000):
        cache.put(key, key)
    assert len(cache) == 1000
    assert cache.get(199_999) == 199_999 and cache.get(0) is None


def test_a_weighed_cache_bounds_the_total_weight() -> None:
    cache: LRUCache[str, str] = LRUCache(10, weigh=len)
    for key, value in [("a", "xxxx"), ("b", "xxx"), ("c", "xx")]:
        cache.put(key, value)
    assert cache.weight == 9
    cache.put("b", "x")  # a replaced value's weight is given back
    assert cache.weight == 7 and len(cache) == 3
    cache.put("d", "xxxxx")  # 12 > 10: "a", the least recently used, goes
    assert cache.get("a") is None and cache.weight == 8
    cache.put("e", "x" * 50)  # heavier than the limit on its own: kept, alone
    assert len(cache) == 1 and cache.get("e") is not None and cache.weight == 50
    cache.clear()
    assert cache.weight == 0 and len(cache) == 0


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
def test_the_default_url_equals_the_template(
    repo_type: paths.RepoType, revision: str, filename: str
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
def test_a_cached_placement_equals_a_fresh_one(peer: str | None, lines: list[str]) -> None:
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


def test_placements_are_keyed_by_the_resolved_address_not_the_headers() -> None:
    router = placing_router()
    # Many different header texts naming one client: one cached placement.
    for padding in range(50):
        chain = ", ".join(["192.0.2.1"] * padding + ["203.0.113.9"])
        placed = router.place("10.0.0.1", ForwardingHeaders(forwarded=(chain,)))
        assert str(placed.client.ip) == "203.0.113.9"
    assert len(router._placements) == 1
