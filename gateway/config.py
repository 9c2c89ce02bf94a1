"""Gateway configuration: frozen typed objects, built from YAML over defaults.

Every validation error names the YAML key, the bad value and what is allowed, so an operator can
fix the file from the message alone. Loading never exits the process; the CLI decides that.
"""

from __future__ import annotations

import ipaddress
import os
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml

from gateway.geo.countries import CONTINENTS, lookup_country

CONFIG_ENV_VAR = "MIRROR_GATEWAY_CONFIG"
VANTAGE_ENV_VAR = "MIRROR_GATEWAY_VANTAGE"
ADMIN_TOKEN_ENV_VAR = "MIRROR_GATEWAY_ADMIN_TOKEN"
#: Passwords of Redis and of its sentinels, for deployments that keep them out of the config file
#: (a Kubernetes Secret in the environment, the config in a ConfigMap). The YAML keys win.
REDIS_PASSWORD_ENV_VAR = "MIRROR_GATEWAY_REDIS_PASSWORD"
SENTINEL_PASSWORD_ENV_VAR = "MIRROR_GATEWAY_REDIS_SENTINEL_PASSWORD"

NodeKind = Literal["mirror", "cache", "third_party"]
ForwardedHeader = Literal["x-forwarded-for", "forwarded", "none"]
CacheMode = Literal["private", "cdn-geo"]
TierName = Literal["asn", "country", "continent", "any"]
ProbeMethod = Literal["GET", "HEAD"]
LoadFormat = Literal["json", "prometheus"]
Freshness = Literal["strict", "bounded"]
LogFormat = Literal["json", "text"]
CredentialedRoute = Literal["upstream", "own_nodes"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TIER_ORDER: tuple[TierName, ...] = get_args(TierName)

#: How a node lays out Hugging Face paths. Placeholders are filled with already-encoded values.
DEFAULT_URL_TEMPLATE = "{base}/{type_prefix}{repo}/resolve/{revision}/{path}"
URL_TEMPLATE_FIELDS = frozenset({"base", "type_prefix", "repo_type", "repo", "revision", "path"})

#: Longest drain window (``server.drain_s``); the worker supervisor waits this on top of the
#: graceful stop before it kills a worker.
MAX_DRAIN_S = 300.0

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    #: Longest accepted request path (bytes, percent-encoded form).
    max_path_bytes: int = 4096
    #: Longest accepted request line or header field; longer ones get a JSON 4xx.
    max_header_bytes: int = 8190
    #: The gateway's own public base URL, used in pagination links it hands out. Unset: taken
    #: from each request's Host.
    public_url: str | None = None
    #: Answer plain redirects straight from the connection (``web.fastpath``); off, every request
    #: goes through aiohttp's handlers. The answers are the same.
    fast_path: bool = True
    #: After SIGTERM, /readyz answers 503 this long while everything else is served as usual,
    #: so load balancers take the instance out before its listener closes. 0: stop at once.
    drain_s: float = 5.0
    #: A request's head (request line and headers) must arrive whole within this long of its
    #: first byte (or of the connection opening); slower clients (slowloris) are disconnected.
    header_timeout_s: float = 10.0
    #: A request's body must arrive whole within this long of its head.
    body_timeout_s: float = 60.0
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 75.0
    #: Client connections one worker holds; past it new connections are closed at once. Lowered
    #: at start to what the open-file limit leaves room for.
    max_connections: int = 10_000
    #: Client connections from one address (an IPv6 /64) at once; trusted proxies are exempt.
    max_connections_per_ip: int = 256


@dataclass(frozen=True, slots=True)
class ClientIPConfig:
    trusted_proxies: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    cdn_client_ip_header: str | None = None
    cdn_country_header: str | None = None


@dataclass(frozen=True, slots=True)
class GeoIPConfig:
    #: None selects the GeoLite2 City database bundled with the ``maxminddb-geolite2`` package.
    city_db: Path | None = None
    asn_db: Path | None = None
    cache_size: int = 65536
    stale_after_days: int = 45


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "https://huggingface.co"
    #: Metadata calls (repo info, tree, paths-info) give up after this long.
    api_timeout_s: float = 10.0
    #: Largest request body passed through to the upstream API (paths-info forms and the like).
    max_request_bytes: int = 1_048_576
    #: A relayed answer (API call, private file) must be complete within this long; a
    #: trickling upstream is cut, so it cannot hold a connection for ever.
    relay_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    #: How long a moving ref (branch, tag, PR) is taken to point at the commit last seen.
    ref_ttl_s: float = 60.0
    #: How long commit-keyed data is kept in Redis (it never changes).
    commit_ttl_s: float = 7 * 86400.0
    #: Repository revisions held in memory (LRU).
    memory_entries: int = 4096
    #: Most tree pages read for one revision.
    max_pages: int = 200
    #: ``Retry-After`` sent when upstream is unreachable and nothing is cached.
    retry_after_s: int = 5


@dataclass(frozen=True, slots=True)
class SyncConfig:
    #: How often node manifests are read and sampled.
    interval_s: float = 60.0
    #: Files checked per node and round: a HEAD against the catalog's size and etag ...
    verify_samples: int = 3
    #: ... plus a full sha256 of sampled files up to this size.
    verify_max_bytes: int = 1_048_576
    #: A commit a node newly lists enters service only once every listed file's size (HEAD)
    #: and the sha256 of a sample weighted toward the largest files have been confirmed.
    admission: bool = True
    #: Files hashed in full at admission (drawn with weights by size) ...
    admission_samples: int = 8
    #: ... among those up to this size; larger ones are checked by HEAD alone.
    admission_max_bytes: int = 64 * 1_048_576
    #: Checks of one node under way at once during admission.
    admission_concurrency: int = 16
    #: One node's admissions of a round give up after this long; the commits stay out of
    #: service and are tried again the next round.
    admission_timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The routing rule's terms (docs/routing.md): a node's cost for a client is its distance in
    km, plus probe latency converted to km, minus bonuses for a shared network and country."""

    #: Widest match a node may be chosen from at all; clients with nothing that close go upstream.
    max_tier: TierName = "any"
    #: Countries whose clients only leave the country when no domestic node is up and free.
    domestic_first: frozenset[str] = frozenset()
    #: Subtracted from the cost of a node in the client's own network (ASN).
    asn_bonus_km: float = 100.0
    #: Subtracted from the cost of a node in the client's own country.
    country_bonus_km: float = 200.0
    #: Nodes whose cost is within max(near_equal_km, near_equal_ratio * best cost) of the best
    #: count as equally good, and share the traffic by free capacity times weight.
    near_equal_km: float = 100.0
    near_equal_ratio: float = 0.1
    #: Probe latency enters the cost as distance: each millisecond counts as this many km.
    km_per_latency_ms: float = 10.0
    #: Share of its capacity a node is taken to carry before any load reading or estimate.
    load_prior: float = 0.5
    #: Bounded-load rendezvous for cache nodes: no cache takes more than this factor times the
    #: mean share of recent redirects among the near-equal caches.
    cache_load_bound: float = 1.25
    #: Skip a node at once when its latest probe timed out or could not connect, rather than
    #: waiting for ``probing.fall`` failures (clients would meet the same failure).
    avoid_transport_failing: bool = True


#: Routing keys that no longer exist, and what to do instead.
RETIRED_ROUTING_KEYS = {
    "load_penalty_km": (
        "load no longer adds distance: near-equal nodes share traffic by free capacity and a "
        "full node takes none; remove the key (routing.load_prior sets the load assumed "
        "before a node's first reading; docs/routing.md)"
    ),
}


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    cache_mode: CacheMode = "private"
    #: Seconds a CDN may keep a redirect in ``cdn-geo`` mode.
    max_age: int = 60
    #: RFC 6249 ``Link: rel=duplicate`` alternatives sent with each redirect.
    duplicate_links: int = 3


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    #: Where a resolve request carrying credentials (``Authorization``, ``Cookie``) is sent:
    #: wget and hfd.sh send them again to the host a redirect names. ``upstream``: to upstream
    #: only, so no node sees them; ``own_nodes``: to nodes of kind mirror or cache as well.
    #: Never to a ``third_party`` node.
    route: CredentialedRoute = "upstream"


@dataclass(frozen=True, slots=True)
class GitConfig:
    #: Pass git's smart HTTP (clone, fetch) to upstream and answer the git-lfs batch API.
    enabled: bool = True
    #: Largest request body passed on (``git-upload-pack`` wants and haves, LFS batch JSON).
    max_request_bytes: int = 8 * 1_048_576
    #: Largest answer relayed (the pack of a clone); a longer one is cut off.
    max_response_bytes: int = 4 * 1024**3
    #: A relayed request, body included, gives up after this long.
    timeout_s: float = 900.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: LogFormat = "json"
    #: One line per request: id, client country, chosen node, reason, status, duration.
    access: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    #: Serve /metrics on its own port (e.g. to keep it off the public listener); unset: on the
    #: serving port.
    port: int | None = None
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """A Redis primary found through Redis Sentinel, followed across failovers."""

    #: The name the sentinels monitor the primary under (``sentinel monitor <name> ...``).
    master_name: str
    #: ``(host, port)`` of each sentinel; any one that answers is enough.
    addresses: tuple[tuple[str, int], ...]
    #: AUTH password of the sentinels themselves (``requirepass`` in sentinel.conf).
    sentinel_password: str | None = None
    db: int = 0
    #: TLS to the sentinels and to the primary; ``tls_ca_file`` verifies their certificates.
    tls: bool = False
    tls_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None = None
    #: Instead of ``url``: a Sentinel-managed primary. At most one of the two is set.
    sentinel: SentinelConfig | None = None
    #: AUTH password of the Redis server(s), for either way; a password in ``url`` wins.
    password: str | None = None
    key_prefix: str = "mg:"
    connect_timeout_s: float = 1.0
    #: Every Redis command gives up after this long; the gateway then runs on its snapshot.
    command_timeout_s: float = 0.5

    @property
    def enabled(self) -> bool:
        """Whether live state is shared through Redis (by URL or through Sentinel)."""
        return self.url is not None or self.sentinel is not None


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    #: Path below the node's base URL; a node that answers it as expected is up.
    path: str = "/"
    method: ProbeMethod = "GET"
    #: Redirects are not followed: a node that redirects is alive.
    expect_status: frozenset[int] = frozenset({200, 204, 301, 302, 303, 307, 308})
    #: With GET: the body must have exactly this many bytes (a known small file).
    expect_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ProbingConfig:
    enabled: bool = True
    interval_s: float = 5.0
    connect_timeout_s: float = 2.0
    timeout_s: float = 5.0
    #: Consecutive failed probes before a node is marked down.
    fall: int = 3
    #: Consecutive good probes before a down (or new) node is marked up.
    rise: int = 2
    concurrency: int = 32
    latency_ewma_alpha: float = 0.3
    #: Where this instance probes from; instances with the same vantage share one prober.
    vantage: str = "default"
    probe: ProbeSpec = field(default_factory=ProbeSpec)


@dataclass(frozen=True, slots=True)
class StateConfig:
    #: Full re-read of shared state, on top of change notifications; skipped while no record
    #: was written since the last one.
    resync_s: float = 10.0
    #: Redirect counts are summed per window to estimate load of nodes that publish none.
    redirect_window_s: float = 10.0
    #: Mean download duration assumed when turning a redirect rate into concurrent downloads.
    estimated_download_s: float = 60.0
    #: The newest window's weight in the smoothed redirect count (1.0: that window alone).
    redirect_smoothing: float = 0.3
    #: A node's load (fraction of capacity) is taken up only when it moves by at least this
    #: much, or crosses full capacity: reports and estimates wobble, and every change re-ranks
    #: the routing cells that read the node.
    load_deadband: float = 0.05


@dataclass(frozen=True, slots=True)
class AdminConfig:
    #: Bearer token for the admin HTTP API; unset keeps the API off.
    token: str | None = None
    #: Wrong admin tokens one client may present per window before it gets 429s.
    max_failures: int = 10
    failure_window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ServiceArea:
    countries: frozenset[str] = frozenset()
    continents: frozenset[str] = frozenset()
    asns: frozenset[int] = frozenset()

    @property
    def everywhere(self) -> bool:
        return not (self.countries or self.continents or self.asns)


@dataclass(frozen=True, slots=True)
class Capacity:
    connections: int | None = None
    egress_mbps: float | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: str
    base_url: str
    kind: NodeKind = "mirror"
    country: str | None = None
    continent: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    asns: frozenset[int] = frozenset()
    weight: float = 1.0
    capacity: Capacity = field(default_factory=Capacity)
    serves: ServiceArea = field(default_factory=ServiceArea)
    url_template: str = DEFAULT_URL_TEMPLATE
    enabled: bool = True
    #: Overrides ``probing.probe`` for this node.
    probe: ProbeSpec | None = None
    #: Where the node publishes its load (absolute URL); see docs/protocol.md, "Load reports".
    load_url: str | None = None
    load_format: LoadFormat = "json"
    #: Where the node publishes which commits it holds; unset: it is taken to hold everything.
    manifest_url: str | None = None
    #: strict: serve only the exact commit asked for. bounded: for a moving ref, the node may
    #: serve its own latest synced commit of that ref if synced less than max_lag_s ago.
    freshness: Freshness = "strict"
    max_lag_s: float = 86400.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    client_ip: ClientIPConfig = field(default_factory=ClientIPConfig)
    geoip: GeoIPConfig = field(default_factory=GeoIPConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    git: GitConfig = field(default_factory=GitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    nodes: tuple[NodeConfig, ...] = ()


# --------------------------------------------------------------------------- parsing helpers

T = TypeVar("T")
D = TypeVar("D")


class _Section:
    """A YAML mapping being read, with its dotted key path for error messages."""

    def __init__(self, data: object, path: str, allowed: Iterable[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'top level'}: expected a mapping, got {_show(data)}")
        allowed = tuple(allowed)
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise ConfigError(f"{where}: unknown key; allowed keys: {', '.join(allowed)}")
        self._data = data
        self._path = path

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        return self._data.get(name) is not None

    def raw(self, name: str) -> object:
        return self._data.get(name)

    def get(self, name: str, default: D, convert: Callable[[object, str], T]) -> T | D:
        value = self._data.get(name)
        if value is None:
            return default
        return convert(value, self.key(name))

    def section(self, name: str, allowed: Iterable[str]) -> _Section:
        return _Section(self._data.get(name), self.key(name), allowed)


def _keys(cls: type) -> tuple[str, ...]:
    """YAML keys of a section whose keys are its dataclass's field names."""
    return tuple(f.name for f in fields(cls))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(minimum: int, maximum: int) -> Callable[[object, str], int]:
    def convert(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{key}: {value} is out of range; allowed: {minimum}..{maximum}")
        return value

    return convert


def _float(minimum: float, maximum: float) -> Callable[[object, str], float]:
    def convert(value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{key}: {value} is out of range; allowed: {minimum}..{maximum}")
        return float(value)

    return convert


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    return value.strip()


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], Any]:
    def convert(value: object, key: str) -> str:
        if value not in choices:
            raise ConfigError(
                f"{key}: {_show(value)} is not allowed; allowed: {', '.join(choices)}"
            )
        return str(value)

    return convert


def _list(value: object, key: str) -> list[object]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {_show(value)}")
    return value


def _no_blanks(text: str, key: str) -> None:
    """URLs go into redirect headers as they are: a space or a control character would end a
    header, or add one."""
    if any(char <= " " or char == "\x7f" for char in text):
        raise ConfigError(f"{key}: {_show(text)} must not contain spaces or control characters")


def _http_url(value: object, key: str) -> str:
    text = _str(value, key).rstrip("/")
    _no_blanks(text, key)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {_show(value)} is not an absolute http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{key}: {_show(value)} must not carry a query, fragment or credentials")
    return text


def _header_name(value: object, key: str) -> str:
    text = _str(value, key).lower()
    token_chars = set(string.ascii_lowercase + string.digits + "!#$%&'*+-.^_`|~")
    if not set(text) <= token_chars:
        raise ConfigError(f"{key}: {_show(value)} is not a valid HTTP header name")
    return text


def _country(value: object, key: str) -> str:
    code = value.upper() if isinstance(value, str) else value
    if not isinstance(code, str) or lookup_country(code) is None:
        raise ConfigError(
            f"{key}: {_show(value)} is not a known ISO 3166-1 alpha-2 country code "
            "(see geodata/countries.tsv)"
        )
    return code


def _continent(value: object, key: str) -> str:
    code = value.upper() if isinstance(value, str) else value
    if code not in CONTINENTS:
        allowed = ", ".join(sorted(CONTINENTS))
        raise ConfigError(f"{key}: {_show(value)} is not a continent code; allowed: {allowed}")
    return str(code)


def _asn(value: object, key: str) -> int:
    if isinstance(value, str) and value.upper().startswith("AS"):
        value = value[2:]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return _int(1, 2**32 - 1)(value, key)


def _network(value: object, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ConfigError(
            f"{key}: {_show(value)} is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)"
        ) from None


def _each(convert: Callable[[object, str], T]) -> Callable[[object, str], tuple[T, ...]]:
    def convert_all(value: object, key: str) -> tuple[T, ...]:
        return tuple(convert(item, f"{key}[{i}]") for i, item in enumerate(_list(value, key)))

    return convert_all


def _path(value: object, key: str) -> Path:
    return Path(os.path.expanduser(_str(value, key)))


def _url_template(value: object, key: str) -> str:
    template = _str(value, key)
    _no_blanks(template, key)
    if not template.startswith("{base}/"):
        raise ConfigError(
            f"{key}: {_show(value)} must start with '{{base}}/' so redirects stay on the node"
        )
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{key}: {_show(value)} is not a valid template ({exc})") from None
    unknown = fields - URL_TEMPLATE_FIELDS
    if unknown:
        raise ConfigError(
            f"{key}: unknown placeholder {{{sorted(unknown)[0]}}}; "
            f"allowed: {', '.join('{' + f + '}' for f in sorted(URL_TEMPLATE_FIELDS))}"
        )
    return template


# --------------------------------------------------------------------------- sections


def _server(s: _Section) -> ServerConfig:
    d = ServerConfig()
    return ServerConfig(
        host=s.get("host", d.host, _str),
        port=s.get("port", d.port, _int(0, 65535)),
        max_path_bytes=s.get("max_path_bytes", d.max_path_bytes, _int(256, 65536)),
        max_header_bytes=s.get("max_header_bytes", d.max_header_bytes, _int(1024, 65536)),
        public_url=s.get("public_url", None, _http_url),
        fast_path=s.get("fast_path", d.fast_path, _bool),
        drain_s=s.get("drain_s", d.drain_s, _float(0.0, MAX_DRAIN_S)),
        header_timeout_s=s.get("header_timeout_s", d.header_timeout_s, _float(0.5, 300.0)),
        body_timeout_s=s.get("body_timeout_s", d.body_timeout_s, _float(0.5, 3600.0)),
        keepalive_timeout_s=s.get(
            "keepalive_timeout_s", d.keepalive_timeout_s, _float(0.5, 3600.0)
        ),
        max_connections=s.get("max_connections", d.max_connections, _int(1, 1_000_000)),
        max_connections_per_ip=s.get(
            "max_connections_per_ip", d.max_connections_per_ip, _int(1, 1_000_000)
        ),
    )


def _client_ip(s: _Section) -> ClientIPConfig:
    d = ClientIPConfig()
    return ClientIPConfig(
        trusted_proxies=s.get("trusted_proxies", d.trusted_proxies, _each(_network)),
        forwarded_header=s.get(
            "forwarded_header", d.forwarded_header, _choice(get_args(ForwardedHeader))
        ),
        cdn_client_ip_header=s.get("cdn_client_ip_header", None, _header_name),
        cdn_country_header=s.get("cdn_country_header", None, _header_name),
    )


def _geoip(s: _Section) -> GeoIPConfig:
    d = GeoIPConfig()
    return GeoIPConfig(
        city_db=s.get("city_db", None, _path),
        asn_db=s.get("asn_db", None, _path),
        cache_size=s.get("cache_size", d.cache_size, _int(0, 10_000_000)),
        stale_after_days=s.get("stale_after_days", d.stale_after_days, _int(1, 36500)),
    )


def _routing(s: _Section) -> RoutingConfig:
    d = RoutingConfig()
    for key, instead in RETIRED_ROUTING_KEYS.items():
        if s.has(key):
            raise ConfigError(f"{s.key(key)}: no longer used; {instead}")
    return RoutingConfig(
        max_tier=s.get("max_tier", d.max_tier, _choice(TIER_ORDER)),
        domestic_first=frozenset(s.get("domestic_first", (), _each(_country))),
        asn_bonus_km=s.get("asn_bonus_km", d.asn_bonus_km, _float(0.0, 5_000.0)),
        country_bonus_km=s.get("country_bonus_km", d.country_bonus_km, _float(0.0, 5_000.0)),
        near_equal_km=s.get("near_equal_km", d.near_equal_km, _float(0.0, 20_000.0)),
        near_equal_ratio=s.get("near_equal_ratio", d.near_equal_ratio, _float(0.0, 10.0)),
        km_per_latency_ms=s.get("km_per_latency_ms", d.km_per_latency_ms, _float(0.0, 10_000.0)),
        load_prior=s.get("load_prior", d.load_prior, _float(0.0, 1.0)),
        cache_load_bound=s.get("cache_load_bound", d.cache_load_bound, _float(1.0, 100.0)),
        avoid_transport_failing=s.get("avoid_transport_failing", d.avoid_transport_failing, _bool),
    )


def _responses(s: _Section) -> ResponsesConfig:
    d = ResponsesConfig()
    return ResponsesConfig(
        cache_mode=s.get("cache_mode", d.cache_mode, _choice(get_args(CacheMode))),
        max_age=s.get("max_age", d.max_age, _int(0, 86400)),
        duplicate_links=s.get("duplicate_links", d.duplicate_links, _int(0, 50)),
    )


def _credentials(s: _Section) -> CredentialsConfig:
    d = CredentialsConfig()
    return CredentialsConfig(route=s.get("route", d.route, _choice(get_args(CredentialedRoute))))


def _git(s: _Section) -> GitConfig:
    d = GitConfig()
    return GitConfig(
        enabled=s.get("enabled", d.enabled, _bool),
        max_request_bytes=s.get(
            "max_request_bytes", d.max_request_bytes, _int(1024, 1024 * 1_048_576)
        ),
        max_response_bytes=s.get("max_response_bytes", d.max_response_bytes, _int(1024, 2**50)),
        timeout_s=s.get("timeout_s", d.timeout_s, _float(1.0, 86400.0)),
    )


def _host_port(value: object, key: str) -> tuple[str, int]:
    text = _str(value, key)
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"{key}: {_show(value)} is not host:port (e.g. 10.0.0.5:26379, [::1]:26379)"
        )
    return host, int(port)


def _sentinel(s: _Section) -> SentinelConfig:
    master_name = s.get("master_name", None, _str)
    if master_name is None:
        raise ConfigError(f"{s.key('master_name')}: required: the name the sentinels monitor")
    addresses = s.get("addresses", (), _each(_host_port))
    if not addresses:
        raise ConfigError(
            f"{s.key('addresses')}: required: a list of sentinel host:port, e.g. "
            "['10.0.0.5:26379', '10.0.0.6:26379', '10.0.0.7:26379']"
        )
    tls = s.get("tls", False, _bool)
    tls_ca_file = s.get("tls_ca_file", None, _path)
    if tls_ca_file is not None and not tls:
        raise ConfigError(f"{s.key('tls_ca_file')}: needs {s.key('tls')}: true")
    return SentinelConfig(
        master_name=master_name,
        addresses=addresses,
        sentinel_password=s.get(
            "sentinel_password", os.environ.get(SENTINEL_PASSWORD_ENV_VAR) or None, _str
        ),
        db=s.get("db", 0, _int(0, 1_000_000)),
        tls=tls,
        tls_ca_file=tls_ca_file,
    )


def _redis(s: _Section) -> RedisConfig:
    d = RedisConfig()
    url = s.get("url", None, _str)
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"redis.url: {_show(url)} must be a redis://, rediss:// or unix:// URL")
    sentinel = None
    if s.has("sentinel"):
        if url is not None:
            raise ConfigError(
                "redis.sentinel: not allowed together with redis.url; allowed: either redis.url "
                "(one Redis server) or redis.sentinel (a Sentinel-managed primary)"
            )
        sentinel = _sentinel(s.section("sentinel", _keys(SentinelConfig)))
    return RedisConfig(
        url=url,
        sentinel=sentinel,
        password=s.get("password", os.environ.get(REDIS_PASSWORD_ENV_VAR) or None, _str),
        key_prefix=s.get("key_prefix", d.key_prefix, _str),
        connect_timeout_s=s.get("connect_timeout_s", d.connect_timeout_s, _float(0.01, 60.0)),
        command_timeout_s=s.get("command_timeout_s", d.command_timeout_s, _float(0.01, 60.0)),
    )


def _status_code(value: object, key: str) -> int:
    return _int(100, 599)(value, key)


def _probe_spec(s: _Section, default: ProbeSpec) -> ProbeSpec:
    path = s.get("path", default.path, _str)
    if not path.startswith("/") or any(c in path for c in "\r\n #"):
        raise ConfigError(f"{s.key('path')}: {_show(path)} must be a path starting with '/'")
    return ProbeSpec(
        path=path,
        method=s.get("method", default.method, _choice(get_args(ProbeMethod))),
        expect_status=frozenset(s.get("expect_status", default.expect_status, _each(_status_code))),
        expect_bytes=s.get("expect_bytes", default.expect_bytes, _int(0, 2**40)),
    )


def _probing(s: _Section) -> ProbingConfig:
    d = ProbingConfig()
    config = ProbingConfig(
        enabled=s.get("enabled", d.enabled, _bool),
        interval_s=s.get("interval_s", d.interval_s, _float(0.05, 3600.0)),
        connect_timeout_s=s.get("connect_timeout_s", d.connect_timeout_s, _float(0.01, 60.0)),
        timeout_s=s.get("timeout_s", d.timeout_s, _float(0.01, 300.0)),
        fall=s.get("fall", d.fall, _int(1, 100)),
        rise=s.get("rise", d.rise, _int(1, 100)),
        concurrency=s.get("concurrency", d.concurrency, _int(1, 10_000)),
        latency_ewma_alpha=s.get("latency_ewma_alpha", d.latency_ewma_alpha, _float(0.01, 1.0)),
        vantage=s.get("vantage", os.environ.get(VANTAGE_ENV_VAR) or d.vantage, _vantage),
        probe=_probe_spec(s.section("probe", _keys(ProbeSpec)), d.probe),
    )
    if config.connect_timeout_s > config.timeout_s:
        raise ConfigError(
            f"{s.key('connect_timeout_s')}: {config.connect_timeout_s} exceeds "
            f"{s.key('timeout_s')} ({config.timeout_s})"
        )
    return config


def _vantage(value: object, key: str) -> str:
    text = _str(value, key)
    if not set(text) <= set(string.ascii_letters + string.digits + "-_."):
        raise ConfigError(f"{key}: {_show(value)} may use only letters, digits, - _ .")
    return text


def _state(s: _Section) -> StateConfig:
    d = StateConfig()
    return StateConfig(
        resync_s=s.get("resync_s", d.resync_s, _float(0.1, 3600.0)),
        redirect_window_s=s.get("redirect_window_s", d.redirect_window_s, _float(1.0, 3600.0)),
        estimated_download_s=s.get(
            "estimated_download_s", d.estimated_download_s, _float(0.1, 86400.0)
        ),
        redirect_smoothing=s.get("redirect_smoothing", d.redirect_smoothing, _float(0.05, 1.0)),
        load_deadband=s.get("load_deadband", d.load_deadband, _float(0.0, 0.5)),
    )


def _upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    return UpstreamConfig(
        url=s.get("url", d.url, _http_url),
        api_timeout_s=s.get("api_timeout_s", d.api_timeout_s, _float(0.1, 600.0)),
        max_request_bytes=s.get("max_request_bytes", d.max_request_bytes, _int(1024, 2**30)),
        relay_timeout_s=s.get("relay_timeout_s", d.relay_timeout_s, _float(1.0, 86400.0)),
    )


def _catalog(s: _Section) -> CatalogConfig:
    d = CatalogConfig()
    return CatalogConfig(
        ref_ttl_s=s.get("ref_ttl_s", d.ref_ttl_s, _float(0.0, 86400.0)),
        commit_ttl_s=s.get("commit_ttl_s", d.commit_ttl_s, _float(60.0, 365 * 86400.0)),
        memory_entries=s.get("memory_entries", d.memory_entries, _int(1, 10_000_000)),
        max_pages=s.get("max_pages", d.max_pages, _int(1, 100_000)),
        retry_after_s=s.get("retry_after_s", d.retry_after_s, _int(1, 3600)),
    )


def _sync(s: _Section) -> SyncConfig:
    d = SyncConfig()
    return SyncConfig(
        interval_s=s.get("interval_s", d.interval_s, _float(0.05, 86400.0)),
        verify_samples=s.get("verify_samples", d.verify_samples, _int(0, 1000)),
        verify_max_bytes=s.get("verify_max_bytes", d.verify_max_bytes, _int(0, 2**34)),
        admission=s.get("admission", d.admission, _bool),
        admission_samples=s.get("admission_samples", d.admission_samples, _int(0, 10_000)),
        admission_max_bytes=s.get("admission_max_bytes", d.admission_max_bytes, _int(0, 2**40)),
        admission_concurrency=s.get(
            "admission_concurrency", d.admission_concurrency, _int(1, 1024)
        ),
        admission_timeout_s=s.get(
            "admission_timeout_s", d.admission_timeout_s, _float(1.0, 86400.0)
        ),
    )


def _logging(s: _Section) -> LoggingConfig:
    d = LoggingConfig()
    return LoggingConfig(
        format=s.get("format", d.format, _choice(get_args(LogFormat))),
        access=s.get("access", d.access, _bool),
    )


def _metrics(s: _Section) -> MetricsConfig:
    d = MetricsConfig()
    return MetricsConfig(
        enabled=s.get("enabled", d.enabled, _bool),
        port=s.get("port", None, _int(1, 65535)),
        host=s.get("host", d.host, _str),
    )


def _admin(s: _Section) -> AdminConfig:
    token = s.get("token", os.environ.get(ADMIN_TOKEN_ENV_VAR) or None, _str)
    if token is not None and len(token) < 16:
        raise ConfigError(
            f"{s.key('token')}: too short ({len(token)} characters); use at least 16 "
            f"(or set {ADMIN_TOKEN_ENV_VAR})"
        )
    d = AdminConfig()
    return AdminConfig(
        token=token,
        max_failures=s.get("max_failures", d.max_failures, _int(1, 100_000)),
        failure_window_s=s.get("failure_window_s", d.failure_window_s, _float(1.0, 86400.0)),
    )


_NODE_KEYS = (
    "id", "url", "kind", "country", "continent", "latitude", "longitude", "asns", "weight",
    "capacity", "serves", "url_template", "enabled", "probe", "load_url", "load_format",
    "manifest_url", "freshness", "max_lag_s",
)  # fmt: skip


def _node(value: object, key: str, default_probe: ProbeSpec) -> NodeConfig:
    s = _Section(value, key, _NODE_KEYS)
    node_id = s.get("id", "", _str)
    if not node_id:
        raise ConfigError(f"{s.key('id')}: required")
    if not set(node_id) <= set(string.ascii_letters + string.digits + "-_."):
        raise ConfigError(f"{s.key('id')}: {_show(node_id)} may use only letters, digits, - _ .")
    if not s.has("url"):
        raise ConfigError(f"{s.key('url')}: required (the node's base URL)")
    country = s.get("country", None, _country)
    known = lookup_country(country) if country else None
    continent = s.get("continent", known.continent if known else None, _continent)
    latitude = s.get("latitude", None, _float(-90.0, 90.0))
    longitude = s.get("longitude", None, _float(-180.0, 180.0))
    if (latitude is None) != (longitude is None):
        raise ConfigError(f"{key}: give both latitude and longitude, or neither")
    if latitude is None and known is not None:
        latitude, longitude = known.latitude, known.longitude
    capacity = s.section("capacity", _keys(Capacity))
    serves = s.section("serves", _keys(ServiceArea))
    return NodeConfig(
        id=node_id,
        base_url=s.get("url", "", _http_url),
        kind=s.get("kind", "mirror", _choice(get_args(NodeKind))),
        country=country,
        continent=continent,
        latitude=latitude,
        longitude=longitude,
        asns=frozenset(s.get("asns", (), _each(_asn))),
        weight=s.get("weight", 1.0, _float(0.001, 1_000_000.0)),
        capacity=Capacity(
            connections=capacity.get("connections", None, _int(1, 10_000_000)),
            egress_mbps=capacity.get("egress_mbps", None, _float(0.001, 10_000_000.0)),
        ),
        serves=ServiceArea(
            countries=frozenset(serves.get("countries", (), _each(_country))),
            continents=frozenset(serves.get("continents", (), _each(_continent))),
            asns=frozenset(serves.get("asns", (), _each(_asn))),
        ),
        url_template=s.get("url_template", DEFAULT_URL_TEMPLATE, _url_template),
        enabled=s.get("enabled", True, _bool),
        probe=_probe_spec(s.section("probe", _keys(ProbeSpec)), default_probe)
        if s.has("probe")
        else None,
        load_url=s.get("load_url", None, _http_url),
        load_format=s.get("load_format", "json", _choice(get_args(LoadFormat))),
        manifest_url=s.get("manifest_url", None, _http_url),
        freshness=s.get("freshness", "strict", _choice(get_args(Freshness))),
        max_lag_s=s.get("max_lag_s", 86400.0, _float(0.0, 365 * 86400.0)),
    )


def _nodes(value: object, key: str, default_probe: ProbeSpec) -> tuple[NodeConfig, ...]:
    nodes = tuple(
        _node(item, f"{key}[{i}]", default_probe) for i, item in enumerate(_list(value, key))
    )
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if node.id in seen:
            raise ConfigError(f"{key}[{i}].id: duplicate node id {node.id!r}")
        seen.add(node.id)
    return nodes


def config_from_mapping(data: object) -> GatewayConfig:
    """Build a validated config from parsed YAML (``None`` gives the embedded defaults)."""
    top = _Section(data, "", _keys(GatewayConfig))
    probing = _probing(top.section("probing", _keys(ProbingConfig)))
    config = GatewayConfig(
        server=_server(top.section("server", _keys(ServerConfig))),
        client_ip=_client_ip(top.section("client_ip", _keys(ClientIPConfig))),
        geoip=_geoip(top.section("geoip", _keys(GeoIPConfig))),
        upstream=_upstream(top.section("upstream", _keys(UpstreamConfig))),
        routing=_routing(top.section("routing", (*_keys(RoutingConfig), *RETIRED_ROUTING_KEYS))),
        responses=_responses(top.section("responses", _keys(ResponsesConfig))),
        redis=_redis(top.section("redis", _keys(RedisConfig))),
        probing=probing,
        state=_state(top.section("state", _keys(StateConfig))),
        admin=_admin(top.section("admin", _keys(AdminConfig))),
        catalog=_catalog(top.section("catalog", _keys(CatalogConfig))),
        sync=_sync(top.section("sync", _keys(SyncConfig))),
        credentials=_credentials(top.section("credentials", _keys(CredentialsConfig))),
        git=_git(top.section("git", _keys(GitConfig))),
        logging=_logging(top.section("logging", _keys(LoggingConfig))),
        metrics=_metrics(top.section("metrics", _keys(MetricsConfig))),
        nodes=top.get("nodes", (), lambda v, k: _nodes(v, k, probing.probe)),
    )
    if config.responses.cache_mode == "cdn-geo" and config.client_ip.cdn_country_header is None:
        raise ConfigError(
            "responses.cache_mode: 'cdn-geo' needs client_ip.cdn_country_header to be set, "
            "because cached redirects may only vary on that header"
        )
    return config


def load_config(path: str | os.PathLike[str] | None) -> GatewayConfig:
    """Load a YAML file; ``None`` means the embedded defaults (no nodes, everything upstream)."""
    return config_from_mapping(None if path is None else read_yaml(path))


def read_yaml(path: str | os.PathLike[str]) -> object:
    """A config file's parsed YAML; ConfigError naming the file when it cannot be had."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{os.fspath(path)}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {exc}") from None
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{exc.key}: duplicate key ({os.fspath(path)} line {exc.line}); "
            "each key may appear once per section"
        ) from None
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping.

    Plain YAML keeps the last of the two silently, so an operator's edit further up the file
    would do nothing. Merge keys (``<<``) may still override what they bring in.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths = _mapping_paths(node, "")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                where = self._paths.get(id(node), "")
                raise _DuplicateKey(
                    f"{where}.{key}" if where else str(key), key_node.start_mark.line + 1
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _mapping_paths(node: yaml.Node, path: str) -> dict[int, str]:
    """The dotted key path (as in error messages) of every mapping below ``node``."""
    paths: dict[int, str] = {}
    if isinstance(node, yaml.MappingNode):
        paths[id(node)] = path
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            paths.update(_mapping_paths(value_node, f"{path}.{key}" if path else str(key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            paths.update(_mapping_paths(item, f"{path}[{i}]"))
    return paths


def resolve_config_path(flag_value: str | None) -> str | None:
    """The ``--config`` flag wins over the environment variable."""
    return flag_value or os.environ.get(CONFIG_ENV_VAR) or None
