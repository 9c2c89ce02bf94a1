from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import EXIT_BAD_CONFIG, main
from gateway.config import (
    DEFAULT_URL_TEMPLATE,
    REDIS_PASSWORD_ENV_VAR,
    SENTINEL_PASSWORD_ENV_VAR,
    ConfigError,
    GatewayConfig,
    SentinelConfig,
    config_from_mapping,
    load_config,
    resolve_config_path,
)

EXAMPLE_CONFIG = Path(__file__).parent.parent / "config" / "gateway.yaml"


def node(**overrides: Any) -> dict[str, Any]:
    return {"id": "n1", "url": "https://n1.example", **overrides}


def test_no_file_gives_embedded_defaults() -> None:
    config = load_config(None)
    assert config == GatewayConfig()
    assert config.nodes == ()
    assert config.upstream.url == "https://huggingface.co"
    assert ipaddress.ip_address("127.0.0.1") in config.client_ip.trusted_proxies[0]


def test_example_config_expresses_the_china_rule() -> None:
    config = load_config(EXAMPLE_CONFIG)
    assert [n.id for n in config.nodes] == ["cn-beijing", "cn-shanghai", "cn-guangzhou-cache"]
    for n in config.nodes:
        assert n.serves.countries == frozenset({"CN"})
        assert n.continent == "AS"
    assert config.nodes[2].kind == "cache"
    assert config.nodes[0].asns == frozenset({4134})
    assert config.routing.domestic_first == frozenset({"CN"})


def test_routing_keys_and_defaults() -> None:
    routing = config_from_mapping(
        {"routing": {"domestic_first": ["cn", "RU"], "asn_bonus_km": 50, "load_prior": 0.25}}
    ).routing
    assert routing.domestic_first == frozenset({"CN", "RU"})
    assert (routing.asn_bonus_km, routing.country_bonus_km) == (50.0, 200.0)
    assert (routing.near_equal_km, routing.near_equal_ratio) == (100.0, 0.1)
    assert routing.load_prior == 0.25


def test_node_fills_continent_and_centre_from_country() -> None:
    config = config_from_mapping({"nodes": [node(country="de")]})
    (n,) = config.nodes
    assert (n.country, n.continent) == ("DE", "EU")
    assert n.latitude is not None and 47 < n.latitude < 55
    assert n.url_template == DEFAULT_URL_TEMPLATE
    assert n.base_url == "https://n1.example"


def test_asn_forms_and_trailing_slash() -> None:
    config = config_from_mapping(
        {"nodes": [node(url="http://n1.example/hf/", asns=["AS4134", 4837, "9808"])]}
    )
    assert config.nodes[0].asns == frozenset({4134, 4837, 9808})
    assert config.nodes[0].base_url == "http://n1.example/hf"


BAD_CONFIGS: list[tuple[str, object, list[str]]] = [
    ("top-level-list", [1, 2], ["top level", "mapping"]),
    ("unknown-top-key", {"nodez": []}, ["nodez", "unknown key", "allowed keys", "nodes"]),
    ("unknown-nested-key", {"server": {"prot": 1}}, ["server.prot", "allowed keys", "port"]),
    ("port-type", {"server": {"port": "80"}}, ["server.port", "integer", "'80'"]),
    ("port-range", {"server": {"port": 70000}}, ["server.port", "70000", "0..65535"]),
    ("bool-as-int", {"server": {"port": True}}, ["server.port", "integer"]),
    (
        "forwarded-header",
        {"client_ip": {"forwarded_header": "x-real-ip"}},
        ["client_ip.forwarded_header", "x-real-ip", "x-forwarded-for, forwarded, none"],
    ),
    (
        "bad-cidr",
        {"client_ip": {"trusted_proxies": ["10.0.0.0/8", "10.0.0.300/8"]}},
        ["client_ip.trusted_proxies[1]", "10.0.0.300/8", "CIDR"],
    ),
    (
        "cdn-header-name",
        {"client_ip": {"cdn_country_header": "cf ipcountry"}},
        ["client_ip.cdn_country_header", "header name"],
    ),
    ("max-tier", {"routing": {"max_tier": "planet"}}, ["routing.max_tier", "asn, country"]),
    (
        "retired-load-penalty",
        {"routing": {"load_penalty_km": 2000}},
        ["routing.load_penalty_km", "no longer used", "free capacity", "remove the key"],
    ),
    (
        "domestic-first-country",
        {"routing": {"domestic_first": ["CN", "XX"]}},
        ["routing.domestic_first[1]", "'XX'", "ISO 3166-1"],
    ),
    ("asn-bonus", {"routing": {"asn_bonus_km": -1}}, ["routing.asn_bonus_km", "0.0..5000.0"]),
    ("load-prior", {"routing": {"load_prior": 1.5}}, ["routing.load_prior", "0.0..1.0"]),
    ("git-timeout", {"git": {"timeout_s": 0}}, ["git.timeout_s", "1.0..86400.0"]),
    (
        "admission-concurrency",
        {"sync": {"admission_concurrency": 0}},
        ["sync.admission_concurrency", "1..1024"],
    ),
    ("git-enabled", {"git": {"enabled": "yes"}}, ["git.enabled", "true or false"]),
    (
        "credentials-route",
        {"credentials": {"route": "anywhere"}},
        ["credentials.route", "'anywhere'", "upstream, own_nodes"],
    ),
    (
        "cache-mode",
        {"responses": {"cache_mode": "public"}},
        ["responses.cache_mode", "private, cdn-geo"],
    ),
    (
        "cdn-geo-without-header",
        {"responses": {"cache_mode": "cdn-geo"}},
        ["responses.cache_mode", "client_ip.cdn_country_header"],
    ),
    ("load-deadband", {"state": {"load_deadband": 0.8}}, ["state.load_deadband", "0.0..0.5"]),
    ("fast-path", {"server": {"fast_path": "yes"}}, ["server.fast_path", "true or false"]),
    ("upstream-scheme", {"upstream": {"url": "ftp://x"}}, ["upstream.url", "http"]),
    ("upstream-query", {"upstream": {"url": "https://x/?a=1"}}, ["upstream.url", "query"]),
    (
        "upstream-control",
        {"upstream": {"url": "https://x/\r\nSet-Cookie: a=1"}},
        ["upstream.url", "control characters"],
    ),
    ("node-url-space", {"nodes": [node(url="https://x/a b")]}, ["nodes[0].url", "spaces"]),
    ("redis-scheme", {"redis": {"url": "http://r"}}, ["redis.url", "redis://"]),
    (
        "redis-url-and-sentinel",
        {"redis": {"url": "redis://r", "sentinel": {"master_name": "m", "addresses": ["s:1"]}}},
        ["redis.sentinel", "redis.url", "either"],
    ),
    (
        "sentinel-no-master",
        {"redis": {"sentinel": {"addresses": ["s:26379"]}}},
        ["redis.sentinel.master_name", "required"],
    ),
    (
        "sentinel-no-addresses",
        {"redis": {"sentinel": {"master_name": "m"}}},
        ["redis.sentinel.addresses", "required", "host:port"],
    ),
    (
        "sentinel-address",
        {"redis": {"sentinel": {"master_name": "m", "addresses": ["s:1", "s"]}}},
        ["redis.sentinel.addresses[1]", "host:port"],
    ),
    (
        "sentinel-port",
        {"redis": {"sentinel": {"master_name": "m", "addresses": ["s:99999"]}}},
        ["redis.sentinel.addresses[0]", "host:port"],
    ),
    (
        "sentinel-ca-without-tls",
        {"redis": {"sentinel": {"master_name": "m", "addresses": ["s:1"], "tls_ca_file": "/ca"}}},
        ["redis.sentinel.tls_ca_file", "redis.sentinel.tls: true"],
    ),
    (
        "sentinel-unknown-key",
        {"redis": {"sentinel": {"master_name": "m", "addresses": ["s:1"], "service": "x"}}},
        ["redis.sentinel.service", "master_name, addresses"],
    ),
    ("nodes-not-list", {"nodes": {"id": "x"}}, ["nodes", "list"]),
    ("node-missing-id", {"nodes": [{"url": "https://x"}]}, ["nodes[0].id", "required"]),
    ("node-missing-url", {"nodes": [{"id": "x"}]}, ["nodes[0].url", "required"]),
    ("node-bad-id", {"nodes": [node(id="a b")]}, ["nodes[0].id", "letters, digits"]),
    ("node-dup-id", {"nodes": [node(), node()]}, ["nodes[1].id", "duplicate", "n1"]),
    ("node-kind", {"nodes": [node(kind="proxy")]}, ["nodes[0].kind", "mirror, cache, third_party"]),
    ("node-country", {"nodes": [node(country="XX")]}, ["nodes[0].country", "'XX'", "ISO 3166"]),
    (
        "node-continent",
        {"nodes": [node(continent="EA")]},
        ["nodes[0].continent", "AF, AN, AS, EU, NA, OC, SA"],
    ),
    ("node-lat-only", {"nodes": [node(latitude=1.0)]}, ["nodes[0]", "both latitude and longitude"]),
    ("node-lat-range", {"nodes": [node(latitude=91, longitude=0)]}, ["nodes[0].latitude", "91"]),
    ("node-weight", {"nodes": [node(weight=0)]}, ["nodes[0].weight", "0.001"]),
    ("node-asn", {"nodes": [node(asns=["ASX"])]}, ["nodes[0].asns[0]", "integer"]),
    (
        "serves-country",
        {"nodes": [node(serves={"countries": ["CN", "China"]})]},
        ["nodes[0].serves.countries[1]", "'China'"],
    ),
    (
        "serves-unknown-key",
        {"nodes": [node(serves={"regions": ["x"]})]},
        ["nodes[0].serves.regions", "countries, continents, asns"],
    ),
    (
        "capacity-connections",
        {"nodes": [node(capacity={"connections": -1})]},
        ["nodes[0].capacity.connections", "-1"],
    ),
    (
        "template-off-base",
        {"nodes": [node(url_template="https://evil.example/{path}")]},
        ["nodes[0].url_template", "{base}/"],
    ),
    (
        "template-placeholder",
        {"nodes": [node(url_template="{base}/{repo}/{query}")]},
        ["nodes[0].url_template", "{query}", "{base}"],
    ),
    (
        "template-control",
        {"nodes": [node(url_template="{base}/{path}\x7f")]},
        ["nodes[0].url_template", "control characters"],
    ),
    (
        "template-syntax",
        {"nodes": [node(url_template="{base}/{repo")]},
        ["nodes[0].url_template", "not a valid template"],
    ),
    ("enabled-type", {"nodes": [node(enabled="yes")]}, ["nodes[0].enabled", "true or false"]),
    ("drain-range", {"server": {"drain_s": -1}}, ["server.drain_s", "0.0..300.0"]),
    ("drain-type", {"server": {"drain_s": "5s"}}, ["server.drain_s", "a number"]),
    (
        "header-timeout",
        {"server": {"header_timeout_s": 0}},
        ["server.header_timeout_s", "0.5..300.0"],
    ),
    ("body-timeout", {"server": {"body_timeout_s": "1m"}}, ["server.body_timeout_s", "a number"]),
    (
        "keepalive-timeout",
        {"server": {"keepalive_timeout_s": 3630}},
        ["server.keepalive_timeout_s", "0.5..3600.0"],
    ),
    (
        "max-connections",
        {"server": {"max_connections": 0}},
        ["server.max_connections", "1..1000000"],
    ),
    (
        "max-connections-per-ip",
        {"server": {"max_connections_per_ip": 1.5}},
        ["server.max_connections_per_ip", "an integer"],
    ),
    (
        "relay-timeout",
        {"upstream": {"relay_timeout_s": 0}},
        ["upstream.relay_timeout_s", "1.0..86400.0"],
    ),
    ("admin-failures", {"admin": {"max_failures": 0}}, ["admin.max_failures", "1..100000"]),
    (
        "admin-window",
        {"admin": {"failure_window_s": 0.5}},
        ["admin.failure_window_s", "1.0..86400.0"],
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [(d, e) for _, d, e in BAD_CONFIGS], ids=[i for i, _, _ in BAD_CONFIGS]
)
def test_bad_config_names_key_and_allowed_values(data: object, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    for fragment in expected:
        assert fragment in str(info.value)


def test_sentinel_settings_and_passwords_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV_VAR, "from-env")
    monkeypatch.setenv(SENTINEL_PASSWORD_ENV_VAR, "sentinel-env")
    sentinel = {"master_name": "gw", "addresses": ["10.0.0.5:26379", "[::1]:26380"]}
    config = config_from_mapping({"redis": {"sentinel": sentinel}})
    assert config.redis.enabled
    assert config.redis.url is None
    assert config.redis.sentinel == SentinelConfig(
        master_name="gw",
        addresses=(("10.0.0.5", 26379), ("::1", 26380)),
        sentinel_password="sentinel-env",
    )
    assert config.redis.password == "from-env"
    # A password in the file wins over the environment.
    config = config_from_mapping({"redis": {"url": "redis://r:6379/0", "password": "file"}})
    assert config.redis.password == "file"
    assert not config_from_mapping(None).redis.enabled


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_GATEWAY_CONFIG", "/from/env.yaml")
    assert resolve_config_path("/from/flag.yaml") == "/from/flag.yaml"
    assert resolve_config_path(None) == "/from/env.yaml"
    monkeypatch.delenv("MIRROR_GATEWAY_CONFIG")
    assert resolve_config_path(None) is None


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(EXAMPLE_CONFIG)]) == 0
    assert "OK (3 nodes)" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"routing": {"max_tier": "galaxy"}}))
    assert main(["check-config", "--config", str(bad)]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "routing.max_tier" in err
    assert "'galaxy'" in err
    assert "asn, country, continent, any" in err
