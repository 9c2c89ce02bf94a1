"""The HF test infrastructure itself, without the gateway: the fake hub answers real clients
the way huggingface.co does, mirror nodes serve what they claim, the client helpers work."""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from aiohttp import web
from fake_hub import (
    FakeHub,
    FakeRepo,
    ThreadedServer,
    git_blob_sha1,
    parse_range,
    sha256_hex,
    standard_repos,
)
from hf_clients import (
    ALL_CLIENTS,
    ENTRY_NOT_FOUND,
    Call,
    curl_download,
    error_type,
    expect_ok,
    run_calls,
    run_client,
    wget_download,
)
from hf_nodes import HfMirrorNode

TINY = "acme/tiny-model"
WEIGHTS = "model.safetensors"
NESTED = "nested dir/with spaces/tokenizer.json"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """The hub without Xet bait: clients talking to it directly would otherwise switch to Xet."""
    with FakeHub(xet=False) as server:
        yield server


@pytest.fixture(scope="module")
def xet_hub() -> Iterator[FakeHub]:
    """The hub as the gateway tests use it: LFS answers and tree entries carry Xet bait."""
    with FakeHub() as server:
        yield server


@pytest.fixture
def tiny(hub: FakeHub) -> FakeRepo:
    return hub.repo(TINY)


def fetch(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request, redirects NOT followed: status, headers, body."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def fetch_json(url: str, **kwargs: Any) -> Any:
    status, _, body = fetch(url, **kwargs)
    assert status == 200, body
    return json.loads(body)


def tagged(hub: FakeHub, tag: str) -> list[str]:
    """``METHOD site path`` of the requests that carried ``X-Test-Tag: tag``."""
    return [f"{r.method} {r.site} {r.path}" for r in hub.seen if r.header("X-Test-Tag") == tag]


# --------------------------------------------------------------------------- data model


def test_standard_repos_are_deterministic_and_as_documented() -> None:
    first, second = standard_repos(), standard_repos()
    assert [(r.repo_id, r.refs) for r in first] == [(r.repo_id, r.refs) for r in second]
    repos = {r.repo_id: r for r in first}
    assert set(repos) == {TINY, "acme/data", "acme/gated-model", "acme/private-model"}

    tiny = repos[TINY]
    v1, v2, pr = tiny.commits
    assert tiny.refs == {"main": v2.sha, "v1.0": v1.sha, "refs/pr/1": pr.sha}
    assert set(v1.files) == {"config.json", WEIGHTS, NESTED, "README.md"}
    assert set(v2.files) == set(v1.files) | {"generation_config.json"}
    assert v1.files["config.json"] != v2.files["config.json"]
    assert v1.files[WEIGHTS] == v2.files[WEIGHTS] and len(v1.files[WEIGHTS]) == 3 * 1024 * 1024
    assert v2.lfs == {WEIGHTS} and pr.parent == v2.sha
    assert v2.etag(WEIGHTS) == sha256_hex(v2.files[WEIGHTS])
    assert v2.etag("config.json") == git_blob_sha1(v2.files["config.json"])
    assert len(v2.sha) == 40 and len({v1.sha, v2.sha, pr.sha}) == 3

    data = repos["acme/data"]
    assert data.repo_type == "dataset"
    assert data.head().lfs == {"data/train-00000.parquet"}
    assert len(data.head().files["data/train-00000.parquet"]) == 200 * 1024
    assert repos["acme/gated-model"].gated and not repos["acme/gated-model"].private
    assert repos["acme/private-model"].private and not repos["acme/private-model"].gated


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-", 10) == (2, 9)
    assert parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("items=1-2", 10) is None  # not a byte range: ignored, as RFC 9110 allows
    with pytest.raises(web.HTTPRequestRangeNotSatisfiable):
        parse_range("bytes=10-", 10)


# --------------------------------------------------------------------------- the hub's HTTP shapes


def test_repo_info(hub: FakeHub, tiny: FakeRepo) -> None:
    info = fetch_json(f"{hub.url}/api/models/{TINY}")
    assert info["id"] == TINY and info["sha"] == tiny.refs["main"]
    assert info["private"] is False and info["gated"] is False
    assert [s["rfilename"] for s in info["siblings"]] == sorted(tiny.head().files)
    assert "size" not in info["siblings"][0]  # file metadata only on request

    info = fetch_json(f"{hub.url}/api/models/{TINY}/revision/refs%2Fpr%2F1?blobs=true")
    assert info["sha"] == tiny.refs["refs/pr/1"]
    weights = next(s for s in info["siblings"] if s["rfilename"] == WEIGHTS)
    head = tiny.head()
    assert weights["size"] == 3 * 1024 * 1024 and weights["blobId"] == head.blob_id(WEIGHTS)
    assert weights["lfs"]["sha256"] == head.sha256(WEIGHTS)

    assert fetch_json(f"{hub.url}/api/models/{TINY}/revision/v1.0")["sha"] == tiny.refs["v1.0"]
    assert fetch_json(f"{hub.url}/api/datasets/acme/data")["id"] == "acme/data"
    assert fetch_json(f"{hub.url}/api/models/acme/gated-model")["gated"] == "manual"


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/api/models/acme/nope", {}, 401, "RepoNotFound"),
        ("/api/models/acme/private-model", {}, 401, "RepoNotFound"),
        ("/api/datasets/acme/tiny-model", {}, 401, "RepoNotFound"),  # wrong type
        ("/api/models/acme/tiny-model/revision/nope", {}, 404, "RevisionNotFound"),
        ("/api/models/acme/tiny-model/tree/main/nope", {}, 404, "EntryNotFound"),
        ("/acme/gated-model/resolve/main/config.json", {}, 401, "GatedRepo"),
        ("/acme/private-model/resolve/main/config.json", {}, 401, "RepoNotFound"),
        ("/acme/tiny-model/resolve/nope/config.json", {}, 404, "RevisionNotFound"),
        ("/acme/tiny-model/resolve/main/nope.json", {}, 404, "EntryNotFound"),
        ("/api/models/acme/tiny-model", {"Authorization": "Bearer wrong"}, 401, None),
        ("/api/whoami-v2", {}, 404, None),
        ("/api/models/acme/tiny-model/xet-read-token/abc", {}, 404, None),
    ],
)
def test_errors_have_hub_shapes(
    hub: FakeHub, path: str, headers: dict[str, str], status: int, code: str | None
) -> None:
    got_status, got_headers, body = fetch(hub.url + path, headers=headers)
    assert got_status == status, body
    assert got_headers.get("X-Error-Code") == code
    if code == "EntryNotFound":  # the client records .no_exist under this commit
        assert got_headers["X-Repo-Commit"] == hub.repo(TINY).refs["main"]
    if path.startswith("/api/"):
        assert "error" in json.loads(body)


def test_token_unlocks_gated_and_private(hub: FakeHub) -> None:
    auth = hub.auth_headers()
    assert fetch_json(f"{hub.url}/api/models/acme/private-model", headers=auth)["private"] is True
    for repo in ("acme/gated-model", "acme/private-model"):
        status, headers, body = fetch(f"{hub.url}/{repo}/resolve/main/config.json", headers=auth)
        assert status == 200 and json.loads(body)["name"] == repo
        assert headers["X-Repo-Commit"] == hub.repo(repo).head().sha


def test_resolve_plain_file(hub: FakeHub, tiny: FakeRepo) -> None:
    pr = tiny.resolve("refs/pr/1")
    assert pr is not None
    url = hub.resolve_url(tiny, "refs/pr/1", NESTED)
    assert "/resolve/refs%2Fpr%2F1/nested%20dir/with%20spaces/" in url
    for method in ("HEAD", "GET"):
        status, headers, body = fetch(url, method=method)
        assert status == 200
        assert headers["X-Repo-Commit"] == pr.sha
        assert headers["ETag"] == f'"{git_blob_sha1(pr.files[NESTED])}"'
        assert headers["Content-Length"] == str(len(pr.files[NESTED]))
        assert body == (pr.files[NESTED] if method == "GET" else b"")
    status, headers, body = fetch(url, headers={"Range": "bytes=3-"})
    assert status == 206 and body == pr.files[NESTED][3:]


def test_resolve_lfs_file_redirects_to_the_cdn_host(hub: FakeHub, xet_hub: FakeHub) -> None:
    head = hub.repo(TINY).head()
    status, headers, _ = fetch(f"{hub.url}/{TINY}/resolve/main/{WEIGHTS}", method="HEAD")
    assert status == 302
    assert headers["X-Repo-Commit"] == head.sha
    assert headers["X-Linked-Etag"] == f'"{head.sha256(WEIGHTS)}"'
    assert headers["X-Linked-Size"] == str(3 * 1024 * 1024)
    location = headers["Location"]
    assert location == f"{hub.cdn_url}/_cdn/{head.sha256(WEIGHTS)}"
    assert urlsplit(location).hostname == "localhost" != urlsplit(hub.url).hostname
    assert "X-Xet-Hash" not in headers and "Link" not in headers

    status, headers, body = fetch(location, headers={"Range": "bytes=1048576-"})
    assert status == 206 and body == head.files[WEIGHTS][1048576:]
    assert headers["Content-Range"] == f"bytes 1048576-{3 * 1024 * 1024 - 1}/{3 * 1024 * 1024}"

    # The Xet bait a gateway must strip: a hash, and a token route on the hub itself.
    status, headers, _ = fetch(f"{xet_hub.url}/{TINY}/resolve/main/{WEIGHTS}", method="HEAD")
    assert status == 302
    assert headers["X-Xet-Hash"] == head.xet_hash(WEIGHTS) != head.sha256(WEIGHTS)
    assert (
        f'<{xet_hub.url}/api/models/{TINY}/xet-read-token/{head.sha}>; rel="xet-auth"'
        in (headers["Link"])
    )
    status, headers, _ = fetch(f"{xet_hub.url}/{TINY}/resolve/main/config.json", method="HEAD")
    assert status == 200 and "X-Xet-Hash" not in headers  # plain git files are never on Xet


def all_tree_pages(first_url: str) -> tuple[list[dict[str, Any]], list[str]]:
    entries: list[dict[str, Any]] = []
    links: list[str] = []
    url: str | None = first_url
    while url is not None:
        status, headers, body = fetch(url)
        assert status == 200, body
        page = json.loads(body)
        assert page, "a page that is not the last one is never empty"
        entries += page
        link = headers.get("Link")
        url = None
        if link is not None:
            assert link.endswith('>; rel="next"')
            url = link[1 : -len('>; rel="next"')]
            links.append(url)
    return entries, links


def test_tree_paginates_with_absolute_links(hub: FakeHub, xet_hub: FakeHub) -> None:
    head = hub.repo(TINY).head()
    query = urlencode({"recursive": "true", "expand": "false"})
    entries, links = all_tree_pages(f"{hub.url}/api/models/{TINY}/tree/main?{query}")
    assert links and all(
        link.startswith(f"{hub.url}/api/models/{TINY}/tree/main?") for link in links
    )
    assert all("recursive=true" in link and "cursor=" in link for link in links)
    assert len(links) == 3 and hub.page_size == 2  # 7 entries, 2 a page
    files = {e["path"]: e for e in entries if e["type"] == "file"}
    dirs = [e["path"] for e in entries if e["type"] == "directory"]
    assert set(files) == set(head.files)
    assert sorted(dirs) == ["nested dir", "nested dir/with spaces"]
    assert files[WEIGHTS]["lfs"] == {
        "oid": head.sha256(WEIGHTS),
        "size": 3 * 1024 * 1024,
        "pointerSize": files[WEIGHTS]["lfs"]["pointerSize"],
    }
    assert files[WEIGHTS]["oid"] == head.blob_id(WEIGHTS) and "lfs" not in files["config.json"]
    assert not any("xetHash" in e for e in entries)

    xet_entries, _ = all_tree_pages(f"{xet_hub.url}/api/models/{TINY}/tree/main?{query}")
    with_xet = {e["path"]: e["xetHash"] for e in xet_entries if "xetHash" in e}
    assert with_xet == {WEIGHTS: head.xet_hash(WEIGHTS)}

    # Not recursive, below a folder whose name the client percent-encodes whole.
    top, _ = all_tree_pages(f"{hub.url}/api/models/{TINY}/tree/v1.0/nested%20dir")
    assert [(e["type"], e["path"]) for e in top] == [("directory", "nested dir/with spaces")]
    big, links = all_tree_pages(f"{hub.url}/api/models/{TINY}/tree/main?limit=100")
    assert not links and len(big) == 5  # four top-level files and one folder


def test_tree_expand_reports_last_commits(hub: FakeHub, tiny: FakeRepo) -> None:
    v1, v2, _ = tiny.commits
    entries = fetch_json(f"{hub.url}/api/models/{TINY}/tree/main?expand=true&limit=100")
    last = {e["path"]: e["lastCommit"]["id"] for e in entries}
    assert last == {
        "README.md": v1.sha,
        "config.json": v2.sha,
        "generation_config.json": v2.sha,
        WEIGHTS: v1.sha,
        "nested dir": v1.sha,
    }


def test_paths_info_form_and_json(hub: FakeHub, xet_hub: FakeHub, tiny: FakeRepo) -> None:
    form = urlencode(
        [("paths", "config.json"), ("paths", WEIGHTS), ("paths", "nope"), ("expand", "false")]
    )
    url = f"{xet_hub.url}/api/models/{TINY}/paths-info/v1.0"
    status, _, body = fetch(
        url, "POST", {"Content-Type": "application/x-www-form-urlencoded"}, form.encode()
    )
    assert status == 200
    entries = {e["path"]: e for e in json.loads(body)}
    v1 = tiny.commits[0]
    assert set(entries) == {"config.json", WEIGHTS}  # unknown paths are left out
    assert entries["config.json"]["oid"] == v1.blob_id("config.json")
    assert entries[WEIGHTS]["xetHash"] == v1.xet_hash(WEIGHTS)

    payload = json.dumps({"paths": ["nested dir", "README.md"], "expand": True}).encode()
    url = f"{hub.url}/api/models/{TINY}/paths-info/main"
    status, _, body = fetch(url, "POST", {"Content-Type": "application/json"}, payload)
    assert status == 200
    entries = {e["path"]: e for e in json.loads(body)}
    assert entries["nested dir"]["type"] == "directory"
    assert entries["README.md"]["lastCommit"]["id"] == v1.sha


def test_switches_delay_and_outage() -> None:
    with FakeHub(xet=False) as hub:
        hub.delay_s = 0.3
        started = time.monotonic()
        assert fetch(f"{hub.url}/api/models/{TINY}")[0] == 200
        assert time.monotonic() - started >= 0.3
        hub.delay_s = 0
        hub.failing = True
        assert fetch(f"{hub.url}/{TINY}/resolve/main/config.json")[0] == 503
        hub.failure_mode = "reset"
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            fetch(f"{hub.url}/api/models/{TINY}")
        hub.failing = False
        assert fetch(f"{hub.url}/api/models/{TINY}")[0] == 200
        assert [r.path for r in hub.requests_to("/api/models/", "GET")] == [
            f"/api/models/{TINY}"
        ] * 3
        url = hub.url
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", urlsplit(url).port or 0), timeout=2).close()


def test_push_moves_a_branch(tiny: FakeRepo) -> None:
    repo = standard_repos()[0]
    old_main = repo.refs["main"]
    commit = repo.push({"config.json": b"{}", "README.md": None}, title="v3")
    assert repo.refs["main"] == commit.sha != old_main and commit.parent == old_main
    assert "README.md" not in commit.files and commit.lfs == {WEIGHTS}
    assert tiny.refs["main"] == old_main  # every standard_repos() call builds fresh objects


# --------------------------------------------------------------------------- real clients, direct


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_client_downloads_byte_identical(client: str, hub: FakeHub, tmp_path: Path) -> None:
    tiny = hub.repo(TINY)
    head, v1 = tiny.head(), tiny.commits[0]
    tag = f"{client}-{uuid.uuid4()}"
    headers = {"X-Test-Tag": tag, "X-Forwarded-For": "203.0.113.7"}

    def download(filename: str, **kwargs: Any) -> Call:
        return Call("hf_hub_download", {"repo_id": TINY, "filename": filename, **kwargs})

    results = run_calls(
        client,
        hub.url,
        [
            download("config.json", headers=headers),
            download(WEIGHTS, headers=headers),
            download("config.json", revision="v1.0"),
            download(NESTED, revision="refs/pr/1"),
            Call(
                "hf_hub_download",
                {"repo_id": "acme/data", "filename": "README.md", "repo_type": "dataset"},
            ),
        ],
        hf_home=tmp_path,
    )
    config, weights, old_config, nested, dataset = (expect_ok(r) for r in results)
    assert Path(config["path"]).read_bytes() == head.files["config.json"]
    assert Path(weights["path"]).read_bytes() == head.files[WEIGHTS]
    assert weights["files"] == {WEIGHTS: head.sha256(WEIGHTS)}
    # The cache layout the facts describe: snapshots/{commit}/{path} -> blobs/{etag}.
    assert f"/snapshots/{head.sha}/{WEIGHTS}" in weights["path"]
    assert Path(weights["path"]).resolve().name == head.sha256(WEIGHTS)
    assert Path(config["path"]).resolve().name == head.blob_id("config.json")
    assert Path(old_config["path"]).read_bytes() == v1.files["config.json"]
    assert Path(nested["path"]).read_bytes() == head.files[NESTED]
    assert Path(dataset["path"]).read_bytes() == hub.repo("acme/data").head().files["README.md"]

    # Extra headers reach every request of the call, the CDN one included.
    seen = tagged(hub, tag)
    assert f"HEAD hub /{TINY}/resolve/main/config.json" in seen
    assert f"GET hub /{TINY}/resolve/main/config.json" in seen
    assert f"GET cdn /_cdn/{head.sha256(WEIGHTS)}" in seen
    assert all(
        r.header("X-Forwarded-For") == "203.0.113.7"
        for r in hub.seen
        if r.header("X-Test-Tag") == tag
    )


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_client_errors(client: str, hub: FakeHub, tmp_path: Path) -> None:
    token = hub.valid_token

    def download(repo_id: str, filename: str = "config.json", **kwargs: Any) -> Call:
        return Call("hf_hub_download", {"repo_id": repo_id, "filename": filename, **kwargs})

    results = run_calls(
        client,
        hub.url,
        [
            download("acme/gated-model"),
            download("acme/gated-model", WEIGHTS, token=token),
            download("acme/private-model"),
            download("acme/private-model", token=token),
            download(TINY, revision="no-such-branch"),
            download(TINY, "no-such-file.json"),
            download("acme/no-such-repo"),
        ],
        hf_home=tmp_path,
    )
    gated, gated_ok, private, private_ok, revision, entry, repo = results
    assert error_type(gated) == "GatedRepoError"
    assert (
        Path(expect_ok(gated_ok)["path"]).read_bytes()
        == (hub.repo("acme/gated-model").head().files[WEIGHTS])
    )
    assert error_type(private) == "RepositoryNotFoundError"
    assert json.loads(Path(expect_ok(private_ok)["path"]).read_bytes())["name"] == (
        "acme/private-model"
    )
    assert error_type(revision) == "RevisionNotFoundError"
    assert error_type(entry) == ENTRY_NOT_FOUND[client]
    assert "EntryNotFoundError" in entry["error"]["mro"]
    assert error_type(repo) == "RepositoryNotFoundError"
    # Tokens never travel to the CDN, which is another host.
    assert not any(r.header("Authorization") for r in hub.cdn_requests())


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_client_snapshot_and_listing(client: str, hub: FakeHub, tmp_path: Path) -> None:
    tiny = hub.repo(TINY)
    pr = tiny.resolve("refs/pr/1")
    assert pr is not None
    tag = f"{client}-{uuid.uuid4()}"
    results = run_calls(
        client,
        hub.url,
        [
            Call("snapshot_download", {"repo_id": TINY}),
            Call("snapshot_download", {"repo_id": TINY, "revision": "refs/pr/1"}),
            Call("snapshot_download", {"repo_id": "acme/data", "repo_type": "dataset"}),
            Call(
                "list_repo_tree",
                {"repo_id": TINY, "recursive": True, "headers": {"X-Test-Tag": tag}},
            ),
            Call("repo_info", {"repo_id": TINY, "revision": "v1.0"}),
        ],
        hf_home=tmp_path,
    )
    main, pr_snapshot, data, tree, info = (expect_ok(r) for r in results)
    head = tiny.head()
    assert main["files"] == {p: head.sha256(p) for p in head.files}
    assert main["path"].endswith(f"/snapshots/{head.sha}")
    assert pr_snapshot["files"] == {p: pr.sha256(p) for p in pr.files}
    data_head = hub.repo("acme/data").head()
    assert data["files"] == {p: data_head.sha256(p) for p in data_head.files}
    paths = {e["path"] for e in tree["entries"]}
    assert paths == set(head.files) | {"nested dir", "nested dir/with spaces"}
    tree_pages = [s for s in tagged(hub, tag) if "/tree/" in s]
    assert len(tree_pages) == 4 and sum("cursor=" in s for s in tree_pages) == 3  # 7 entries
    assert info["sha"] == tiny.refs["v1.0"]


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_clients_take_the_xet_bait(client: str, xet_hub: FakeHub, tmp_path: Path) -> None:
    """Why the gateway must strip Xet: every client that sees the bait leaves HTTP for Xet."""
    tag = f"{client}-{uuid.uuid4()}"
    result = run_client(
        client,
        xet_hub.url,
        "hf_hub_download",
        hf_home=tmp_path,
        repo_id=TINY,
        filename=WEIGHTS,
        headers={"X-Test-Tag": tag},
    )
    assert not result["ok"]
    head = xet_hub.repo(TINY).head()
    assert f"GET hub /api/models/{TINY}/xet-read-token/{head.sha}" in tagged(xet_hub, tag)
    assert not xet_hub.cdn_requests()  # the HTTP download never started


def test_missing_client_venv_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_clients

    monkeypatch.setitem(hf_clients.CLIENTS, "hf1", tmp_path / "nope" / "python")
    with pytest.raises(hf_clients.ClientMissingError, match="scripts/test"):
        run_client("hf1", "http://127.0.0.1:9", "repo_info", hf_home=tmp_path, repo_id=TINY)


# --------------------------------------------------------------------------- mirror nodes


@pytest.fixture
def stale_node(hub: FakeHub) -> Iterator[HfMirrorNode]:
    """A mirror that synced tiny-model at v1 and acme/data, then stopped syncing."""
    tiny = hub.repo(TINY)
    holds = {("model", TINY): [tiny.commits[0].sha], ("dataset", "acme/data"): []}
    node = HfMirrorNode("stale", hub, holds, synced_at=1732400000.0, generated_at=1732500000.0)
    yield node
    node.stop()


def test_node_serves_held_commits_with_ranges(stale_node: HfMirrorNode, hub: FakeHub) -> None:
    tiny = hub.repo(TINY)
    v1, v2 = tiny.commits[0], tiny.head()
    assert urlsplit(stale_node.url).hostname == "localhost"
    url = f"{stale_node.url}/{TINY}/resolve/{v1.sha}/{WEIGHTS}"
    status, headers, body = fetch(url, "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(3 * 1024 * 1024)
    assert headers["ETag"] == f'"{v1.sha256(WEIGHTS)}"' and headers["Accept-Ranges"] == "bytes"
    status, headers, body = fetch(url, headers={"Range": "bytes=2097152-"})
    assert status == 206 and body == v1.files[WEIGHTS][2097152:]
    assert headers["Content-Range"] == f"bytes 2097152-{3 * 1024 * 1024 - 1}/{3 * 1024 * 1024}"
    assert fetch(url, headers={"Range": f"bytes={3 * 1024 * 1024}-"})[0] == 416
    encoded = f"{stale_node.url}/{TINY}/resolve/{v1.sha}/nested%20dir/with%20spaces/tokenizer.json"
    assert fetch(encoded)[2] == v1.files[NESTED]

    # Not held: another commit, another repo, a file of a held commit that does not exist.
    assert fetch(f"{stale_node.url}/{TINY}/resolve/{v2.sha}/config.json")[0] == 404
    assert fetch(f"{stale_node.url}/acme/gated-model/resolve/main/config.json")[0] == 404
    assert fetch(f"{stale_node.url}/{TINY}/resolve/{v1.sha}/nope")[0] == 404
    # A branch name means the node's own latest synced commit of it (v1: the node is stale).
    assert fetch(f"{stale_node.url}/{TINY}/resolve/main/config.json")[2] == v1.files["config.json"]

    assert fetch(f"{stale_node.url}/health")[0] == 200
    stale_node.health_status = 503
    assert fetch(f"{stale_node.url}/health")[0] == 503
    assert [r.path for r in stale_node.downloads()][:2] == [
        f"/{TINY}/resolve/{v1.sha}/{WEIGHTS}"
    ] * 2
    assert not stale_node.saw_authorization()


def test_node_manifest_format(stale_node: HfMirrorNode, hub: FakeHub) -> None:
    tiny = hub.repo(TINY)
    v1 = tiny.commits[0]
    manifest = fetch_json(stale_node.manifest_url)
    assert manifest == stale_node.manifest()
    assert set(manifest) == {"node", "generated_at", "repos"}
    assert manifest["node"] == "stale" and manifest["generated_at"] == 1732500000.0
    by_id = {r["id"]: r for r in manifest["repos"]}
    assert set(by_id) == {TINY, "acme/data"}
    model = by_id[TINY]
    assert set(model) == {"type", "id", "refs", "commits"}
    assert model["type"] == "model"
    # Tracked refs map to the newest held commit in their history; PR refs are not tracked.
    assert model["refs"] == {"main": v1.sha, "v1.0": v1.sha}
    assert list(model["commits"]) == [v1.sha]
    commit = model["commits"][v1.sha]
    assert set(commit) == {"synced_at", "files"} and commit["synced_at"] == 1732400000.0
    assert commit["files"] == [
        {"path": p, "size": len(v1.files[p]), "sha256": sha256_hex(v1.files[p])}
        for p in sorted(v1.files)
    ]
    assert by_id["acme/data"] == {"type": "dataset", "id": "acme/data", "refs": {}, "commits": {}}


def test_node_corrupt_serves_wrong_bytes_of_the_same_size(
    stale_node: HfMirrorNode, hub: FakeHub
) -> None:
    v1 = hub.repo(TINY).commits[0]
    url = f"{stale_node.url}/{TINY}/resolve/{v1.sha}/config.json"
    stale_node.corrupt("config.json")
    body = fetch(url)[2]
    assert len(body) == len(v1.files["config.json"]) and body != v1.files["config.json"]
    ranged = fetch(url, headers={"Range": "bytes=5-"})[2]
    assert ranged == body[5:]
    files = stale_node.manifest()["repos"][1]["commits"][v1.sha]["files"]
    listed = next(f for f in files if f["path"] == "config.json")
    assert listed["sha256"] == v1.sha256("config.json")  # the node does not know
    stale_node.heal()
    assert fetch(url)[2] == v1.files["config.json"]


def test_default_mirror_holds_every_public_commit(hub: FakeHub) -> None:
    with HfMirrorNode("full", hub) as node:
        repos = {(r["type"], r["id"]): r for r in node.manifest()["repos"]}
        assert set(repos) == {("model", TINY), ("dataset", "acme/data")}
        tiny = hub.repo(TINY)
        assert set(repos["model", TINY]["commits"]) == {c.sha for c in tiny.commits}
        assert repos["model", TINY]["refs"] == {
            "main": tiny.refs["main"],
            "v1.0": tiny.refs["v1.0"],
        }
        data = hub.repo("acme/data").head()
        url = f"{node.url}/datasets/acme/data/resolve/{data.sha}/data/train-00000.parquet"
        assert fetch(url)[2] == data.files["data/train-00000.parquet"]


def test_cache_node_pulls_through(hub: FakeHub) -> None:
    tiny = hub.repo(TINY)
    head = tiny.head()
    with HfMirrorNode("cache", hub, mode="cache") as node:
        assert node.manifest()["repos"] == []
        url = f"{node.url}/{TINY}/resolve/{head.sha}/config.json"
        assert fetch(url)[2] == head.files["config.json"]
        assert fetch(url)[2] == head.files["config.json"]
        assert node.cache_misses == [("model", TINY, head.sha, "config.json")]
        (repo,) = node.manifest()["repos"]
        assert [f["path"] for f in repo["commits"][head.sha]["files"]] == ["config.json"]
        assert repo["refs"] == {"main": head.sha}
        private = hub.repo("acme/private-model").head()
        url = f"{node.url}/acme/private-model/resolve/{private.sha}/config.json"
        assert fetch(url)[0] == 404  # a cache has no token
        assert fetch(f"{node.url}/{TINY}/resolve/{'0' * 40}/config.json")[0] == 404


def test_node_hold_and_drop(stale_node: HfMirrorNode, hub: FakeHub) -> None:
    tiny = hub.repo(TINY)
    v2 = tiny.head()
    stale_node.hold(("model", TINY), v2.sha, at=1732450000.0)
    (model,) = [r for r in stale_node.manifest()["repos"] if r["id"] == TINY]
    assert model["refs"]["main"] == v2.sha
    assert model["commits"][v2.sha]["synced_at"] == 1732450000.0
    stale_node.drop(("model", TINY), v2.sha)
    assert fetch(f"{stale_node.url}/{TINY}/resolve/{v2.sha}/config.json")[0] == 404
    with pytest.raises(KeyError):
        stale_node.hold(("model", TINY), "f" * 40)


class Redirector(ThreadedServer):
    """The least a gateway must do: 302 a resolve URL to a node with the metadata headers."""

    def __init__(self, hub: FakeHub, node_base: str) -> None:
        self.hub, self.node_base = hub, node_base
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['redirector']}"

    def _sites(self) -> dict[str, web.Application]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return {"redirector": app}

    async def _handle(self, request: web.Request) -> web.Response:
        prefix = f"/{TINY}/resolve/"
        revision, _, path = request.path.removeprefix(prefix).partition("/")
        commit = self.hub.repo(TINY).resolve(revision)
        assert commit is not None and path in commit.files
        headers = {
            "Location": f"{self.node_base}{prefix}{commit.sha}/{quote(path)}",
            "X-Repo-Commit": commit.sha,
            "X-Linked-Etag": f'"{commit.etag(path)}"',
            "X-Linked-Size": str(commit.size(path)),
        }
        return web.Response(status=302, headers=headers)


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_clients_download_from_a_node_behind_a_redirect(
    client: str, hub: FakeHub, tmp_path: Path
) -> None:
    """Nodes give clients what they need after a gateway's 302, and never see the token."""
    with HfMirrorNode("n", hub) as node, Redirector(hub, node.url) as redirector:
        results = run_calls(
            client,
            redirector.url,
            [
                Call("hf_hub_download", {"repo_id": TINY, "filename": f, "token": hub.valid_token})
                for f in (WEIGHTS, NESTED)
            ],
            hf_home=tmp_path,
        )
        head = hub.repo(TINY).head()
        for result, path in zip(results, (WEIGHTS, NESTED), strict=True):
            assert Path(expect_ok(result)["path"]).read_bytes() == head.files[path]
        assert [(r.method, r.path.split("/")[-1]) for r in node.downloads()] == [
            ("GET", WEIGHTS),
            ("GET", "tokenizer.json"),
        ]
        assert not node.saw_authorization()


def test_why_nodes_are_named_localhost(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub 1.33 follows a HEAD redirect to the same host NAME, whatever the port: a
    node named 127.0.0.1 like the gateway gets the HEAD and the token, and the download fails
    for want of ``X-Repo-Commit``. Production nodes have host names of their own."""
    with HfMirrorNode("n", hub) as node, Redirector(hub, node.ip_url) as redirector:
        result = run_client(
            "hf1",
            redirector.url,
            "hf_hub_download",
            hf_home=tmp_path,
            repo_id=TINY,
            filename="config.json",
            token=hub.valid_token,
        )
        assert error_type(result) == "LocalEntryNotFoundError"
        assert "X-Repo-Commit" in result["error"]["message"]
        assert node.saw_authorization()


# --------------------------------------------------------------------------- curl and wget


def test_curl_follows_the_cdn_redirect_and_resumes(
    hub: FakeHub, stale_node: HfMirrorNode, tmp_path: Path
) -> None:
    head = hub.repo(TINY).head()
    out = tmp_path / "weights"
    result = curl_download(f"{hub.url}/{TINY}/resolve/main/{WEIGHTS}", out, {"X-Test": "1"})
    assert result.returncode == 0, result.stderr
    assert result.statuses == [302, 200] and result.status == 200
    assert result.headers["content-length"] == str(3 * 1024 * 1024)
    assert out.read_bytes() == head.files[WEIGHTS]

    v1 = hub.repo(TINY).commits[0]
    out.write_bytes(v1.files[WEIGHTS][:1000])
    url = f"{stale_node.url}/{TINY}/resolve/{v1.sha}/{WEIGHTS}"
    result = curl_download(url, out, resume=True)
    assert result.returncode == 0, result.stderr
    assert result.status == 206 and out.read_bytes() == v1.files[WEIGHTS]
    assert stale_node.downloads()[-1].header("Range") == "bytes=1000-"


def test_wget_follows_the_cdn_redirect_and_resumes(
    hub: FakeHub, stale_node: HfMirrorNode, tmp_path: Path
) -> None:
    head = hub.repo(TINY).head()
    out = tmp_path / "weights"
    result = wget_download(
        f"{hub.url}/{TINY}/resolve/main/{WEIGHTS}", out, {"X-Forwarded-For": "198.51.100.1"}
    )
    assert result.returncode == 0, result.stderr
    assert result.statuses == [302, 200]
    assert out.read_bytes() == head.files[WEIGHTS]
    assert hub.cdn_requests()[-1].header("X-Forwarded-For") == "198.51.100.1"

    v1 = hub.repo(TINY).commits[0]
    out.write_bytes(v1.files[WEIGHTS][:5000])
    url = f"{stale_node.url}/{TINY}/resolve/{v1.sha}/{WEIGHTS}"
    result = wget_download(url, out, resume=True)
    assert result.returncode == 0, result.stderr
    assert result.status == 206 and out.read_bytes() == v1.files[WEIGHTS]
    assert stale_node.downloads()[-1].header("Range") == "bytes=5000-"
