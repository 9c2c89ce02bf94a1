"""The node side's pure parts: its config, what to mirror, and the manifest it writes."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError
from gateway.hf.catalog import FileMeta
from gateway.node.manifest import manifest_document
from gateway.node.plan import advance, due_for_removal, select_files, to_retire, wanted
from gateway.node.progress import TerminalBar
from gateway.node.settings import (
    NodeSettings,
    RepoSpec,
    finish,
    load_node_settings,
    parse_repo_arg,
    settings_from_mapping,
)
from gateway.node.store import CommitRecord, FileRecord, RepoRecord
from gateway.node.verify import window
from gateway.state.manifest import MAX_MANIFEST_BYTES, parse_manifest

EXAMPLE = Path(__file__).parent.parent / "config" / "node.yaml"


def test_example_config_loads_with_documented_values() -> None:
    settings = load_node_settings(EXAMPLE)
    assert settings.node_id == "cn-beijing"
    assert settings.root == Path("/srv/mirror-node")
    assert [(r.repo_type, r.repo_id) for r in settings.repos] == [
        ("model", "acme/tiny-model"),
        ("dataset", "acme/data"),
        ("model", "acme/big-model"),
    ]
    assert settings.repos[0].revisions == ("main", "v1.0")
    assert settings.repos[1].allow_patterns == ("*.parquet", "README.md")
    assert settings.repos[2].keep == 1
    # Every value the example shows is the default.
    defaults = NodeSettings(node_id="", root=Path())
    for key in ("upstream", "concurrency", "keep", "prune_after_s", "retries", "piece_bytes"):
        assert getattr(settings, key) == getattr(defaults, key), key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": 1}, "colour: unknown key; allowed keys: node_id, root"),
        ({"concurrency": 0}, "concurrency: 0 is out of range; allowed: 1..256"),
        ({"keep": "two"}, "keep: expected an integer, got 'two'"),
        ({"upstream": "ftp://x"}, "upstream: 'ftp://x' is not an absolute http:// or https://"),
        ({"bandwidth_mbps": -1}, "bandwidth_mbps: -1 is out of range"),
        ({"node_id": "a b"}, "node_id: 'a b' may use only letters, digits, - _ ."),
        ({"token": "t", "token_file": "/f"}, "token_file: give token or token_file, not both"),
        ({"token_file": "/no/such/file"}, "token_file: cannot read '/no/such/file'"),
        ({"repos": {"id": "a/b"}}, "repos: expected a list"),
        ({"repos": [{"revisions": ["main"]}]}, "repos[0].id: required"),
        ({"repos": [{"id": "a/b", "kind": "x"}]}, "repos[0].kind: unknown key; allowed keys: id"),
        ({"repos": [{"id": "a/b", "type": "models"}]},
         "repos[0].type: 'models' is not allowed; allowed: model, dataset, space"),
        ({"repos": [{"id": "../etc"}]}, "repos[0].id: '../etc' is not a valid repository id"),
        ({"repos": [{"id": "a/b", "revisions": []}]}, "repos[0].revisions: name at least one"),
        ({"repos": [{"id": "a/b", "revisions": ["a..b"]}]}, "repos[0].revisions[0]: revision"),
        ({"repos": [{"id": "a/b", "revisions": ["refs/pr/1"]}]}, "pull requests are not"),
        ({"repos": [{"id": "a/b"}, {"id": "a/b"}]}, "repos[1].id: 'a/b' is listed again"),
        ({"repos": [{"id": "a/b", "keep": 0}]}, "repos[0].keep: 0 is out of range"),
    ],
)  # fmt: skip
def test_bad_config_is_refused_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data)
    assert message in str(caught.value)


def test_token_file_is_read_and_root_is_required(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("hf_secret\n")
    settings = settings_from_mapping({"token_file": str(tmp_path / "token")})
    assert settings.token == "hf_secret"
    with pytest.raises(ConfigError, match="root: required"):
        finish(settings)
    assert finish(settings_from_mapping({"root": str(tmp_path), "node_id": "x"})).node_id == "x"


def test_repo_arguments() -> None:
    assert parse_repo_arg("acme/m", "model") == RepoSpec("model", "acme/m", ("main",))
    assert parse_repo_arg("acme/d@v1.0", "dataset") == RepoSpec("dataset", "acme/d", ("v1.0",))
    with pytest.raises(ConfigError, match=r"acme/\.\.@main: 'acme/\.\.' is not a valid"):
        parse_repo_arg("acme/..@main", "model")


def meta(path: str, size: int = 1) -> FileMeta:
    return FileMeta(path, size, "0" * 40, False)


def test_patterns_select_like_huggingface_hub() -> None:
    files = [meta(p) for p in ("b.bin", "a.json", "original/x.pt", "sub/c.parquet")]
    assert [m.path for m in select_files(files, (), ())] == [
        "a.json", "b.bin", "original/x.pt", "sub/c.parquet",
    ]  # fmt: skip
    assert [m.path for m in select_files(files, ("*.json", "original/"), ())] == [
        "a.json",
        "original/x.pt",
    ]
    assert [m.path for m in select_files(files, (), ("*.bin", "original/"))] == [
        "a.json",
        "sub/c.parquet",
    ]
    assert not wanted("a.json", ("*.bin",), ())


def test_ref_history_and_retirement() -> None:
    assert advance((), "c1", 2) == ("c1",)
    assert advance(("c1",), "c2", 2) == ("c2", "c1")
    assert advance(("c2", "c1"), "c3", 2) == ("c3", "c2")
    assert advance(("c2", "c1"), "c1", 2) == ("c1", "c2")  # moved back: no duplicate
    refs = {"main": ("c3", "c2"), "v1": ("c1",)}
    assert to_retire(["c0", "c1", "c2", "c3", "c9"], refs, ["c9"]) == ["c0"]
    assert due_for_removal({"a": 100.0, "b": 50.0}, 159.0, 60.0) == ["b"]
    assert due_for_removal({"a": 100.0, "b": 50.0}, 160.0, 60.0) == ["a", "b"]
    assert due_for_removal({"a": 100.0}, 100.0, 0.0) == ["a"]


def test_rolling_share_covers_everything_over_runs() -> None:
    seen: list[int] = []
    cursor = 0
    for _ in range(4):
        indices, cursor = window(10, 0.25, cursor)
        assert len(indices) == 3
        seen += indices
    assert set(seen) == set(range(10))
    assert window(0, 0.5, 7) == ([], 0)
    assert window(5, 1.0, 3) == ([3, 4, 0, 1, 2], 3)


def _record() -> RepoRecord:
    rng = random.Random(7)

    def file(path: str, size: int, pieces: int) -> FileRecord:
        sha = f"{rng.getrandbits(256):064x}"
        return FileRecord(path, size, sha, sha, True, tuple(sha for _ in range(pieces)))

    record = RepoRecord("model", "acme/m")
    record.commits["a" * 40] = CommitRecord(10.0, 4, (file("w.bin", 9, 3), file("e", 0, 0)))
    record.commits["b" * 40] = CommitRecord(20.0, 4, (file("w.bin", 9, 3),))
    record.commits["c" * 40] = CommitRecord(30.0, 4, (file("x", 1, 1),), broken="x: missing")
    record.commits["d" * 40] = CommitRecord(5.0, 4, (file("y", 1, 1),))
    record.refs = {"main": ("c" * 40, "b" * 40), "v1": ("a" * 40,)}
    record.retired = {"d" * 40: 6.0}
    return record


def test_manifest_is_what_the_gateway_reads() -> None:
    record = _record()
    document = manifest_document("bj", [record], 99.0, lambda r, sha, c: None)
    holdings = parse_manifest("bj", json.dumps(document).encode(), 100.0, MAX_MANIFEST_BYTES)
    key = ("model", "acme/m")
    # Broken and retired commits are not listed; the ref falls back to its newest sound commit.
    assert set(holdings.commits[key]) == {"a" * 40, "b" * 40}
    assert holdings.refs[key] == {"main": "b" * 40, "v1": "a" * 40}
    held = holdings.commits[key]["a" * 40]
    assert held.synced_at == 10.0
    assert held.files["w.bin"] == (9, record.commits["a" * 40].files[0].sha256)
    assert held.pieces["w.bin"].length == 4 and len(held.pieces["w.bin"].sha256) == 3
    assert "e" not in held.pieces  # an empty file has no pieces
    assert holdings.generated_at == 99.0


def test_manifest_leaves_out_commits_the_check_refuses() -> None:
    record = _record()
    document = manifest_document(
        "bj", [record], 1.0, lambda r, sha, c: "gone" if sha == "b" * 40 else None
    )
    (repo,) = document["repos"]
    assert list(repo["commits"]) == ["a" * 40]
    assert repo["refs"] == {"v1": "a" * 40}


def test_terminal_progress_line() -> None:
    out = io.StringIO()
    bar = TerminalBar(out)
    bar.begin("acme/m@abc1234", 2, 2 * 1024 * 1024)
    bar.advance(1024 * 1024)
    bar.file_done()
    bar.end()
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert last == "acme/m@abc1234  1.0/2.0 MiB  1/2 files\x1b[K"
