from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fake_hub import VALID_TOKEN, FakeHub
from geoworld import BEIJING_IP, GeoDBs
from processes import GatewayProcess

from gateway.logs import FIELDS_ATTR, JsonFormatter, request_id

RESOLVE = "/acme/tiny-model/resolve/main/config.json"


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("req.1:2_3", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        (None, False),
        ("has space", False),
        ('quote"', False),
        ("new\nline", False),
        ("ümlaut", False),
    ],
)
def test_request_id_honours_only_sane_tokens(incoming: str | None, kept: bool) -> None:
    rid = request_id(incoming)
    if kept:
        assert rid == incoming
    else:
        assert rid != incoming
        prefix, _, counter = rid.partition("-")
        assert len(prefix) == 16 and all(c in "0123456789abcdef" for c in prefix + counter)
        assert counter


def test_generated_request_ids_are_unique_and_sane() -> None:
    ids = [request_id(None) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    # A generated id is itself a sane token: echoed by the next hop, it is kept as it is.
    assert all(request_id(rid) == rid for rid in ids)


def test_json_formatter_merges_fields() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", (), None)
    setattr(record, FIELDS_ATTR, {"status": 302, "node": "bj"})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request"
    assert (line["logger"], line["level"], line["status"], line["node"]) == (
        "gateway.access",
        "info",
        302,
        "bj",
    )


def access_lines(log: Path) -> list[dict[str, object]]:
    lines = []
    for raw in log.read_text().splitlines():
        entry = json.loads(raw)  # every line the gateway writes is JSON
        if entry["logger"] == "gateway.access":
            lines.append(entry)
    return lines


def test_access_log_lines_and_request_ids(
    geo_dbs: GeoDBs, fake_hub: FakeHub, tmp_path: Path
) -> None:
    config = {
        "upstream": {"url": fake_hub.url},
        "geoip": {"city_db": str(geo_dbs.city), "asn_db": str(geo_dbs.asn)},
        "probing": {"enabled": False},
        "nodes": [
            {"id": "bj", "url": "https://bj.example", "country": "CN",
             "serves": {"countries": ["CN"]}},
        ],
        # The request with a token below is still routed to the node.
        "credentials": {"route": "own_nodes"},
    }  # fmt: skip
    gateway = GatewayProcess(config, tmp_path)
    try:
        _, headers, _ = gateway.get(
            RESOLVE,
            {
                "X-Forwarded-For": BEIJING_IP,
                "X-Request-ID": "trace-42",
                "Authorization": f"Bearer {VALID_TOKEN}",
            },
        )
        assert headers["x-request-id"] == "trace-42"
        _, headers, _ = gateway.get("/acme/tiny-model/resolve/main/nope.bin")
        generated = headers["x-request-id"]
        assert generated != "trace-42" and request_id(generated) == generated
        _, headers, _ = gateway.get("/api/models/acme/tiny-model")
        assert headers["x-request-id"]  # streamed pass-through answers carry it too
    finally:
        assert gateway.stop() == 0
    lines = {entry["request_id"]: entry for entry in access_lines(gateway.log)}
    routed = lines["trace-42"]
    assert routed["status"] == 302
    assert (routed["node"], routed["country"], routed["reason"]) == ("bj", "CN", "same_country")
    assert isinstance(routed["duration_ms"], float)
    failed = lines[generated]
    assert (failed["status"], failed["outcome"], failed["reason"]) == (
        404,
        "error",
        "entry_not_found",
    )
    assert VALID_TOKEN not in gateway.log.read_text()
