"""The world of the HTTP tests: two nodes (``bj`` in Beijing, ``tk`` in Tokyo) in front of the
local hub, the gateway's config over them, a test server with the production runner, and the
requests every HTTP-facing test module sends (bad paths, Hugging Face errors).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import GatewayConfig, GeoIPConfig, config_from_mapping
from gateway.runtime import RUNTIME
from gateway.web.connection import ConnectionRules, make_runner
from gateway.web.fastpath import fast_answer_for

CONFIG_JSON = "/acme/tiny-model/resolve/main/config.json"
MAIN = "853a9daf2c349f8a4b3e618a2961885a5d4f0429"
V1 = "b0bb8d53facbcb75661ed8accd838c06854a92f5"
PR_1 = "3a8caadcefd2fb6ab39bc0fe735009cd20bb33fe"
DATA_MAIN = "42b145c2c9aaa06ed8fb3e3a6ae44ab45e3b9023"
BEIJING_IP = "1.2.3.4"
US_IP = "3.3.3.3"
TOKYO_IP = "6.6.6.6"
HONG_KONG_IP = "7.7.7.7"

NODES = [
    {
        "id": "bj",
        "url": "https://bj.mirror.test",
        "country": "CN",
        "latitude": 39.9,
        "longitude": 116.4,
        "asns": [4134],
        "serves": {"countries": ["CN"]},
    },
    {
        "id": "tk",
        "url": "http://tk.mirror.test:8080/base",
        "country": "JP",
        "serves": {"countries": ["JP"]},
        "url_template": "{base}/hf/{repo_type}/{repo}/{revision}/{path}",
    },
]


class GatewayTestServer(TestServer):
    """A test server running the production runner, so parser-level errors behave as served."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return make_runner(self.app, ConnectionRules(fast_answer_for(self.app[RUNTIME])), **kwargs)


def gateway_config(geoip: GeoIPConfig, upstream_url: str, **sections: Any) -> GatewayConfig:
    # These nodes are not real servers: take them as up rather than probing them.
    base = config_from_mapping(
        {
            "nodes": NODES,
            "probing": {"enabled": False},
            "upstream": {"url": upstream_url},
            **sections,
        }
    )
    return replace(base, geoip=geoip)


async def raw_exchange(host: str, port: int, request: bytes) -> tuple[int, bytes, dict[str, str]]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), body, {k.lower(): v for k, v in headers.items()}


BAD_PATHS = [
    ("dotdot", "/a/b/resolve/main/../../etc/passwd", 400, "path_traversal"),
    ("encoded-dotdot", "/a/b/resolve/main/%2e%2e/%2E%2E/x", 400, "path_traversal"),
    ("nul", "/a/b/resolve/main/x%00y", 400, "control_character"),
    ("crlf", "/a/b/resolve/main/x%0d%0aSet-Cookie:%20a=b", 400, "control_character"),
    ("bad-percent", "/a/b/resolve/main/x%ZZ", 400, "invalid_percent_encoding"),
    ("bad-utf8", "/a/b/resolve/main/x%C3%28", 400, "invalid_utf8"),
    ("bad-repo", "/a--b/c/resolve/main/x", 400, "invalid_repo_id"),
    ("too-long", "/a/b/resolve/main/" + "x" * 5000, 414, "path_too_long"),
    ("not-resolve", "/a/b/blob/main/x", 404, "not_found"),
    ("root", "/", 404, "not_found"),
    ("double-slash-host", "//evil.test/x", 404, "not_found"),
]


HF_ERRORS = [
    ("repo", "/acme/nope/resolve/main/x", 404, "RepoNotFound", None),
    ("revision", "/acme/tiny-model/resolve/nope/config.json", 404, "RevisionNotFound", None),
    ("entry", "/acme/tiny-model/resolve/main/nope.bin", 404, "EntryNotFound", MAIN),
    ("gated-without-token", "/acme/gated-model/resolve/main/config.json", 401, "GatedRepo", None),
]
