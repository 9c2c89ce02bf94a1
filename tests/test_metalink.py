"""Metalink 4 answers and RFC 6249 links, read the way a client reads them.

The world is tests/explain_world.py's, as in tests/test_explain.py: for a Beijing client ``bj``
and ``sh`` are eligible, and every other node is excluded for some reason, so none of them may
ever appear as a source.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import explain_world
import pytest
from aiohttp import ClientResponse
from explain_world import (
    ADMIN,
    CONFIG_JSON,
    FROM_BEIJING,
    PIECE_LENGTH,
    WEIGHTS,
    AiohttpClient,
    World,
    gateway_client,
    open_world,
    world_nodes,
)
from fake_hub import VALID_TOKEN, FakeHub, FakeRepo
from geoworld import ASHBURN_IP
from hf_nodes import HfMirrorNode
from http_world import gateway_config

from gateway.config import GeoIPConfig, ResponsesConfig
from gateway.state.live import ProbeRecord
from gateway.state.manifest import ManifestError, Pieces, parse_manifest
from gateway.web.metalink import (
    METALINK_TYPE,
    UPSTREAM_PRIORITY,
    Source,
    metalink_document,
    preferred_type,
    wants_metalink,
)

NS = "{urn:ietf:params:xml:ns:metalink}"
#: What aria2 sends on every request, whatever its options: a tie, so it gets the redirect.
ARIA2_ACCEPT = "*/*,application/metalink4+xml,application/metalink+xml"
#: What a client that can only use a Metalink sends.
PREFERS_METALINK = "application/metalink4+xml, */*;q=0.5"
GATED_WEIGHTS = "/acme/gated-model/resolve/main/model.safetensors"


@dataclass(frozen=True)
class Metalink:
    name: str
    size: int
    sha256: str | None
    pieces: tuple[int, list[str]] | None
    #: (url, priority, location)
    urls: list[tuple[str, int, str | None]]


def parse_metalink(body: bytes) -> Metalink:
    root = ET.fromstring(body)
    assert root.tag == f"{NS}metalink"
    (entry,) = root.findall(f"{NS}file")
    size = entry.find(f"{NS}size")
    assert size is not None and size.text is not None
    digest = entry.find(f"{NS}hash")
    if digest is not None:
        assert digest.get("type") == "sha-256"
    listing = entry.find(f"{NS}pieces")
    pieces = None
    if listing is not None:
        assert listing.get("type") == "sha-256"
        pieces = (int(listing.get("length", "0")), [h.text or "" for h in listing])
    return Metalink(
        name=entry.get("name", ""),
        size=int(size.text),
        sha256=None if digest is None else digest.text,
        pieces=pieces,
        urls=[
            (u.text or "", int(u.get("priority", "0")), u.get("location"))
            for u in entry.findall(f"{NS}url")
        ],
    )


def piece_hashes(body: bytes, length: int) -> list[str]:
    return [hashlib.sha256(body[i : i + length]).hexdigest() for i in range(0, len(body), length)]


_LINK = re.compile(r"<([^>]*)>([^,]*)")


def links(response: ClientResponse) -> list[tuple[str, dict[str, str]]]:
    """``Link`` as (url, params) pairs, in order."""
    found = []
    for url, params in _LINK.findall(response.headers.get("Link", "")):
        pairs = (p.strip().partition("=") for p in params.split(";") if p.strip())
        found.append((url, {k: v.strip('"') for k, _, v in pairs}))
    return found


def duplicates(response: ClientResponse) -> list[tuple[str, int, str | None]]:
    return [
        (url, int(p["pri"]), p.get("geo")) for url, p in links(response) if p["rel"] == "duplicate"
    ]


# tests/explain_world.py's fixtures, for this module's tests.
mirrors = explain_world.mirrors
world = explain_world.world


def at(world: World, node: str, commit: str, path: str) -> str:
    base = world.hub.url if node == "upstream" else world.mirrors[node].url
    return f"{base}/acme/tiny-model/resolve/{commit}/{path}"


async def metalink_of(world: World, path: str, **headers: str) -> Metalink:
    response = await world.get(path, **headers)
    assert response.status == 200, await response.text()
    assert response.content_type == METALINK_TYPE
    assert response.headers["Cache-Control"] == "private, no-store"
    return parse_metalink(await response.read())


# --------------------------------------------------------------------------- the document


@pytest.mark.parametrize(
    ("suffix", "accept"),
    [(".meta4", "*/*"), ("", METALINK_TYPE), ("", PREFERS_METALINK), (".meta4", ARIA2_ACCEPT)],
    ids=["suffix", "accept", "accept-preferring", "suffix-and-aria2-accept"],
)
async def test_metalink_lists_eligible_nodes_best_first_and_not_upstream(
    world: World, suffix: str, accept: str
) -> None:
    metalink = await metalink_of(world, WEIGHTS + suffix, Accept=accept, **FROM_BEIJING)
    content = world.hub.repo("acme/tiny-model").head().files["model.safetensors"]
    assert metalink.name == "model.safetensors"
    assert metalink.size == len(content)
    assert metalink.sha256 == hashlib.sha256(content).hexdigest()
    assert metalink.pieces == (PIECE_LENGTH, piece_hashes(content, PIECE_LENGTH))
    path = "model.safetensors"
    # lag lacks the commit, bad failed verification, and the rest are excluded by the policy;
    # the client's route is its nodes, so upstream is no source.
    assert metalink.urls == [
        (at(world, "bj", world.main, path), 1, "cn"),
        (at(world, "sh", world.main, path), 2, "cn"),
    ]


async def test_head_and_no_redirect_counted(world: World) -> None:
    response = await world.get(WEIGHTS + ".meta4", "HEAD", **FROM_BEIJING)
    assert response.status == 200 and response.content_type == METALINK_TYPE
    assert await response.read() == b""
    # A Metalink sends the client to several nodes at once: it is not a redirect to one.
    assert world.runtime.store.redirects.current == {}


async def test_plain_git_file_takes_its_hash_from_a_manifest(world: World) -> None:
    metalink = await metalink_of(world, CONFIG_JSON + ".meta4", **FROM_BEIJING)
    content = world.hub.repo("acme/tiny-model").head().files["config.json"]
    assert metalink.sha256 == hashlib.sha256(content).hexdigest()
    assert metalink.pieces == (PIECE_LENGTH, [hashlib.sha256(content).hexdigest()])
    assert [priority for _, priority, _ in metalink.urls] == [1, 2]


async def test_without_manifests_a_git_file_has_no_hash(
    aiohttp_client: AiohttpClient, geoip_config: GeoIPConfig, fake_hub: FakeHub
) -> None:
    # test_http's nodes: bj in Beijing, no manifest, taken to hold everything.
    client = await gateway_client(aiohttp_client, gateway_config(geoip_config, fake_hub.url))
    weights = fake_hub.repo("acme/tiny-model").head().sha256("model.safetensors")
    for path, sha256 in ((CONFIG_JSON, None), (WEIGHTS, weights)):
        response = await client.get(path + ".meta4", headers=FROM_BEIJING)
        metalink = parse_metalink(await response.read())
        assert (metalink.sha256, metalink.pieces) == (sha256, None)
        assert [u.split("/acme/")[0] for u, _, _ in metalink.urls] == [
            "https://bj.mirror.test",
        ]


async def test_excluded_nodes_are_never_listed(world: World) -> None:
    await world.client.post("/admin/nodes/sh/drain", headers=ADMIN)
    metalink = await metalink_of(world, WEIGHTS + ".meta4", **FROM_BEIJING)
    assert [(u.split("/acme/")[0], p) for u, p, _ in metalink.urls] == [
        (world.mirrors["bj"].url, 1),
    ]
    now = time.time()
    await world.runtime.store.publish_probe(
        ProbeRecord("bj", "default", False, "timeout", None, now, None)
    )
    # Only the node at capacity is left: the redirect's last resort is the Metalink's one source.
    metalink = await metalink_of(world, WEIGHTS + ".meta4", **FROM_BEIJING)
    redirect = await world.get(WEIGHTS, **FROM_BEIJING)
    assert redirect.headers["X-Mirror-Node"] == "busy"
    assert [(u, p) for u, p, _ in metalink.urls] == [(redirect.headers["Location"], 1)]


async def test_bounded_node_is_a_source_only_where_its_commit_has_the_same_bytes(
    aiohttp_client: AiohttpClient,
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
    mirrors: dict[str, HfMirrorNode],
) -> None:
    nodes = [{**n, "freshness": "bounded"} if n["id"] == "lag" else n for n in world_nodes(mirrors)]
    world = await open_world(aiohttp_client, geoip_config, fake_hub, mirrors, nodes=nodes)
    v1 = fake_hub.repo("acme/tiny-model").refs["v1.0"]
    # The weights did not change since v1.0: the lagging node serves them from its commit.
    metalink = await metalink_of(world, WEIGHTS + ".meta4", **FROM_BEIJING)
    assert [(u, p) for u, p, _ in metalink.urls] == [
        (at(world, "bj", world.main, "model.safetensors"), 1),
        (at(world, "sh", world.main, "model.safetensors"), 2),
        (at(world, "lag", v1, "model.safetensors"), 3),
    ]
    # config.json did change: v1.0's is another file.
    metalink = await metalink_of(world, CONFIG_JSON + ".meta4", **FROM_BEIJING)
    assert world.mirrors["lag"].url not in " ".join(u for u, _, _ in metalink.urls)
    assert len(metalink.urls) == 2


# --------------------------------------------------------------------------- which requests


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        (None, False),
        ("*/*", False),
        (ARIA2_ACCEPT, False),
        ("*/*;q=0.5, application/metalink4+xml", True),
        ("application/metalink4+xml, application/metalink+xml", True),
        ("application/metalink4+xml;q=0.9, application/octet-stream", False),
        ("application/metalink+xml", False),
        ("APPLICATION/METALINK4+XML", True),
        ("application/metalink4+xml;q=0", False),
        ("application/octet-stream, application/metalink4+xml;q=0.5", False),
        ("application/*;q=0.2, application/metalink4+xml;q=0.3", True),
        ("application/metalink4+xml;q=bogus, */*", False),
    ],
)
def test_wants_metalink(accept: str | None, wanted: bool) -> None:
    assert wants_metalink(accept) is wanted


@pytest.mark.parametrize(
    ("accept", "preferred"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "text/html"),
        ("text/html;q=0.5, application/json", "application/json"),
        ("text/*, application/json;q=0.9", "text/html"),
        ("image/png", None),
    ],
)
def test_preferred_type(accept: str | None, preferred: str | None) -> None:
    assert preferred_type(accept, ("application/json", "text/html")) == preferred


@pytest.mark.parametrize("accept", ["*/*", "application/metalink4+xml;q=0", ARIA2_ACCEPT])
async def test_other_requests_still_get_a_redirect(world: World, accept: str) -> None:
    response = await world.get(WEIGHTS, Accept=accept, **FROM_BEIJING)
    assert response.status == 302


async def test_meta4_of_a_missing_file_is_entry_not_found(world: World) -> None:
    response = await world.get("/acme/tiny-model/resolve/main/nope.bin.meta4", **FROM_BEIJING)
    assert response.status == 404
    assert response.headers["X-Error-Code"] == "EntryNotFound"
    assert response.headers["X-Repo-Commit"] == world.main


async def test_a_repository_meta4_file_is_served_as_a_file(
    aiohttp_client: AiohttpClient, geoip_config: GeoIPConfig
) -> None:
    repo = FakeRepo("model", "acme/described", [], {})
    repo.push({"w.bin": b"weights", "w.bin.meta4": b"<metalink/>"}, lfs={"w.bin"})
    with FakeHub([repo]) as hub:
        client = await gateway_client(aiohttp_client, gateway_config(geoip_config, hub.url))
        own = await client.get(
            "/acme/described/resolve/main/w.bin.meta4", headers=FROM_BEIJING, allow_redirects=False
        )
        assert own.status == 302
        assert own.headers["Location"].endswith("/w.bin.meta4")
        # Nor does a redirect point at a Metalink that the repository's own file shadows.
        weights = await client.get(
            "/acme/described/resolve/main/w.bin", headers=FROM_BEIJING, allow_redirects=False
        )
        assert weights.status == 302
        assert "describedby" not in weights.headers.get("Link", "")


@pytest.mark.parametrize("token", [None, VALID_TOKEN])
@pytest.mark.parametrize(
    "path",
    [
        GATED_WEIGHTS + ".meta4",
        "/acme/private-model/resolve/main/model.safetensors.meta4",
        GATED_WEIGHTS,
    ],
)
async def test_private_and_gated_files_get_no_metalink(
    world: World, path: str, token: str | None
) -> None:
    headers = {"Accept": ARIA2_ACCEPT, **FROM_BEIJING}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await world.get(path, **headers)
    assert response.content_type != METALINK_TYPE
    assert not {"duplicate", "describedby"} & {p.get("rel") for _, p in links(response)}
    leaked = f"{response.headers.get('Location', '')} {await response.text()}"
    assert not any(m.url in leaked for m in world.mirrors.values())
    # As a resolve without the Metalink's Accept answers it.
    plain = await world.get(path, **{**headers, "Accept": "*/*"})
    assert (response.status, response.headers.get("X-Error-Code")) == (
        plain.status,
        plain.headers.get("X-Error-Code"),
    )


# --------------------------------------------------------------------------- RFC 6249


async def test_redirect_names_duplicates_and_its_metalink(world: World) -> None:
    response = await world.get(CONFIG_JSON, **FROM_BEIJING)
    assert response.status == 302
    assert response.headers["Location"] == at(world, "bj", world.main, "config.json")
    assert duplicates(response) == [
        (at(world, "sh", world.main, "config.json"), 2, "cn"),
    ]
    described = [(u, p) for u, p in links(response) if p["rel"] == "describedby"]
    meta4 = f"/acme/tiny-model/resolve/{world.main}/config.json.meta4"
    assert described == [(meta4, {"rel": "describedby", "type": METALINK_TYPE})]
    # The Metalink it points at is the same list with the chosen node first.
    metalink = await metalink_of(world, meta4, **FROM_BEIJING)
    assert metalink.urls == [
        (response.headers["Location"], 1, "cn"),
        *duplicates(response),
    ]


OWN_LAYOUT = "{base}/files/{repo}@{revision}/{path}"


@pytest.mark.parametrize(
    ("n2_template", "n4_template"),
    [(None, None), (OWN_LAYOUT, None), (None, OWN_LAYOUT)],
    ids=["default-layouts", "named-node-own-layout", "unnamed-node-own-layout"],
)
async def test_duplicates_are_bounded_and_name_no_upstream(
    aiohttp_client: AiohttpClient,
    geoip_config: GeoIPConfig,
    fake_hub: FakeHub,
    n2_template: str | None,
    n4_template: str | None,
) -> None:
    nodes = [
        {"id": f"n{i}", "url": f"https://n{i}.mirror.test", "country": "CN",
         "latitude": 39.9, "longitude": 116.4 + i}
        for i in range(6)
    ]  # fmt: skip
    if n2_template:
        nodes[2]["url_template"] = n2_template
    if n4_template:
        # Never named: its layout must not change the header.
        nodes[4]["url_template"] = n4_template
    config = gateway_config(geoip_config, fake_hub.url, nodes=nodes, routing={"near_equal_km": 0})
    client = await gateway_client(aiohttp_client, config)
    for _ in range(2):  # the second answer from what the first one worked out
        response = await client.get(CONFIG_JSON, headers=FROM_BEIJING, allow_redirects=False)
        assert response.headers["X-Mirror-Node"] == "n0"
        commit = response.headers["X-Repo-Commit"]
        path = f"/acme/tiny-model/resolve/{commit}/config.json"
        n2_url = (
            f"https://n2.mirror.test/files/acme/tiny-model@{commit}/config.json"
            if n2_template
            else f"https://n2.mirror.test{path}"
        )
        assert duplicates(response) == [
            (f"https://n1.mirror.test{path}", 2, "cn"),
            (n2_url, 3, "cn"),
            (f"https://n3.mirror.test{path}", 4, "cn"),
        ], "bounded, priorities as in the Metalink"
        assert len(duplicates(response)) == ResponsesConfig().duplicate_links
        assert ("config.json.meta4" in response.headers["Link"]) is True


async def test_redirect_to_upstream_only_points_at_the_metalink(world: World) -> None:
    response = await world.get(CONFIG_JSON, **{"X-Forwarded-For": ASHBURN_IP})
    assert response.headers["X-Mirror-Node"] == "upstream"
    assert [p["rel"] for _, p in links(response)] == ["describedby"]
    # Its Metalink names the one source the route allows that client.
    metalink = await metalink_of(world, CONFIG_JSON + ".meta4", **{"X-Forwarded-For": ASHBURN_IP})
    assert [(u, p) for u, p, _ in metalink.urls] == [
        (at(world, "upstream", world.main, "config.json"), UPSTREAM_PRIORITY)
    ]


# --------------------------------------------------------------------------- formats


def manifest_with_pieces(pieces: Any, size: int = 5) -> bytes:
    entry = {"path": "w.bin", "size": size, "sha256": "a" * 64, "pieces": pieces}
    commit = {"synced_at": 1.0, "files": [entry]}
    repo = {"type": "model", "id": "acme/x", "commits": {"1" * 40: commit}}
    return json.dumps({"node": "n", "generated_at": 1.0, "repos": [repo]}).encode()


def test_manifest_pieces_are_parsed() -> None:
    body = manifest_with_pieces({"length": 2, "sha256": ["b" * 64, "c" * 64, "d" * 64]})
    holding = parse_manifest("n", body, 0.0, 10_000).commits[("model", "acme/x")]["1" * 40]
    assert holding.pieces == {"w.bin": Pieces(2, ("b" * 64, "c" * 64, "d" * 64))}


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ({"length": 2, "sha256": ["b" * 64] * 2}, "2 hashes, but 5 bytes make 3 pieces of 2"),
        ({"length": 0, "sha256": []}, ".pieces.length: expected an integer > 0"),
        ({"length": 5, "sha256": ["B" * 64]}, ".pieces.sha256[0]: expected 64 lowercase hex"),
        ({"sha256": []}, ".pieces.length: missing"),
        ([], ".pieces: expected an object"),
    ],
)
def test_bad_manifest_pieces_refuse_the_manifest(pieces: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        parse_manifest("n", manifest_with_pieces(pieces), 0.0, 10_000)


def test_document_escapes_names_and_urls() -> None:
    name = 'dir/a&b <"c">.bin'
    url = "https://n.test/x?a=1&b=2"
    body = metalink_document(name, 3, None, None, [Source(url, 1, None, None)])
    parsed = parse_metalink(body)
    assert (parsed.name, parsed.urls) == (name, [(url, 1, None)])
