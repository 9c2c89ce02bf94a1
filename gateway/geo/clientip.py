"""Find the real client address of a request, trusting only the configured proxies.

Every proxy appends the address it was connected from to the right of the forwarding header, so the
chain is walked right to left from a trusted peer and the first untrusted entry is the client. What
lies left of it, the left-most X-Forwarded-For entry included, is whatever the client chose to send.
Only the one configured header is read: a header the proxy does not write reaches us as the client
sent it, so trusting it would let any client pick its own address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from gateway.config import ClientIPConfig, ForwardedHeader, IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ClientIPSource = Literal["peer", "x-forwarded-for", "forwarded", "cdn-header"]

#: Longest token worth parsing; a bracketed IPv6 address with a port needs at most 53 characters.
_MAX_TOKEN_CHARS = 64
#: Right-most forwarding entries examined; a longer all-trusted chain is a loop or an attack.
_MAX_ENTRIES = 64
#: RFC 7239 obfuscated port: "_" followed by these characters.
_OBFUSCATED_PORT_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
)
#: Codes CDNs send when they do not know the country (unknown, Europe, Asia/Pacific). Their
#: Tor/anonymous/satellite codes (T1, A1, A2, O1) contain a digit and fail the letters check anyway.
_PLACEHOLDER_COUNTRIES = frozenset({"XX", "EU", "AP"})

#: Trusted networks of one IP version as (netmask, network addresses with that netmask) pairs, so a
#: lookup costs one set probe per distinct prefix length rather than one test per network.
_NetworkTable = tuple[tuple[int, frozenset[int]], ...]


def parse_ip(text: str) -> IPAddress | None:
    """Parse one address token from a header leniently; ``None`` for anything that is not an IP.

    Quotes, brackets, a port and an IPv6 zone are dropped, and IPv4-mapped IPv6 becomes IPv4.
    """
    token = text.strip()
    if len(token) >= 2 and token[0] == '"' == token[-1]:
        token = token[1:-1]
    if not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    if token[0] == "[":
        host, bracket, port = token[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return None
        return _parse_ipv6(host)
    if token.count(":") == 1:
        host, _, port = token.partition(":")
        return _parse_ipv4(host) if _is_port(port) else None
    return _parse_ipv6(token) if ":" in token else _parse_ipv4(token)


def _is_port(text: str) -> bool:
    if text.isascii() and text.isdigit():
        return len(text) <= 5 and int(text) <= 65535
    return len(text) > 1 and text[0] == "_" and _OBFUSCATED_PORT_CHARS.issuperset(text[1:])


def _parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    # inet_pton accepts exactly what IPv4Address accepts (four decimal octets, no leading
    # zeros) at a fifth of the cost of ipaddress's own parser; this runs twice per request.
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        return None


def _parse_ipv6(text: str) -> IPAddress | None:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    # Dual-stack sockets and some proxies report IPv4 clients in mapped form; trust lists and geo
    # lookups are written for the plain IPv4 address.
    mapped = address.ipv4_mapped
    if mapped is not None:
        return mapped
    # A zone only names the receiving host's interface, and it would make otherwise equal
    # addresses compare unequal.
    return ipaddress.IPv6Address(int(address)) if address.scope_id is not None else address


def _forwarded_for_ip(element: str) -> IPAddress | None:
    # Splitting on ";" without honouring quotes is deliberate: only elements written by trusted
    # proxies are ever read, and they never quote a ";" into a "for" value.
    for pair in element.split(";"):
        name, equals, value = pair.partition("=")
        if equals and name.strip().lower() == "for":
            return parse_ip(value)
    return None


def _cdn_country(value: str) -> str | None:
    code = value.strip()
    # The ASCII check comes before upper(), which would turn "ß" into "SS".
    if len(code) != 2 or not (code.isascii() and code.isalpha()):
        return None
    code = code.upper()
    return None if code in _PLACEHOLDER_COUNTRIES else code


def _as_ipv4(network: IPNetwork) -> IPNetwork:
    # Addresses are compared in plain IPv4 form (see _parse_ipv6), so a trusted range written in
    # IPv4-mapped form must be too.
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _network_table(networks: Iterable[IPNetwork]) -> _NetworkTable:
    by_mask: dict[int, set[int]] = {}
    for network in networks:
        by_mask.setdefault(int(network.netmask), set()).add(int(network.network_address))
    return tuple((mask, frozenset(addresses)) for mask, addresses in by_mask.items())


_EntryParser = Callable[[str], IPAddress | None]
#: How to read each forwarding header: the source it reports and how to get the IP of one entry.
_CHAIN_READERS: Mapping[ForwardedHeader, tuple[ClientIPSource, _EntryParser]] = {
    "x-forwarded-for": ("x-forwarded-for", parse_ip),
    "forwarded": ("forwarded", _forwarded_for_ip),
}


class ForwardingHeaders(NamedTuple):
    """The request headers the resolver may read, as the HTTP layer found them."""

    #: Every value of the configured forwarding header, in arrival order (a header may repeat).
    forwarded: tuple[str, ...] = ()
    cdn_client_ip: str | None = None
    cdn_country: str | None = None


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is and which piece of the request said so."""

    #: None only when the peer is not an IP address (a unix socket, say).
    ip: IPAddress | None
    source: ClientIPSource
    #: Upper-case ISO 3166-1 alpha-2 code from a trusted CDN header.
    cdn_country: str | None = None


class ClientIPResolver:
    """Resolves client addresses under one configuration; safe to share between requests."""

    __slots__ = ("_chain", "_reads_cdn_country", "_reads_cdn_ip", "_v4", "_v6")

    def __init__(self, config: ClientIPConfig) -> None:
        networks = [_as_ipv4(network) for network in config.trusted_proxies]
        self._v4 = _network_table(n for n in networks if n.version == 4)
        self._v6 = _network_table(n for n in networks if n.version == 6)
        self._chain = _CHAIN_READERS.get(config.forwarded_header)
        self._reads_cdn_ip = config.cdn_client_ip_header is not None
        self._reads_cdn_country = config.cdn_country_header is not None

    def is_trusted(self, ip: IPAddress) -> bool:
        """Whether ``ip`` (as :func:`parse_ip` returns it) is in one of the trusted networks."""
        table = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        return any((value & mask) in addresses for mask, addresses in table)

    def resolve(self, peer: str | None, headers: ForwardingHeaders) -> ClientAddress:
        """The client behind the TCP ``peer``, reading the headers only if the peer is trusted."""
        peer_ip = parse_ip(peer) if peer is not None else None
        if peer_ip is None or not self.is_trusted(peer_ip):
            return ClientAddress(peer_ip, "peer")
        country = (
            _cdn_country(headers.cdn_country)
            if self._reads_cdn_country and headers.cdn_country is not None
            else None
        )
        if self._reads_cdn_ip and headers.cdn_client_ip is not None:
            cdn_ip = parse_ip(headers.cdn_client_ip)
            if cdn_ip is not None:
                return ClientAddress(cdn_ip, "cdn-header", country)
        if self._chain is not None:
            source, entry_ip = self._chain
            client = self._walk(headers.forwarded, entry_ip)
            if client is not None:
                return ClientAddress(client, source, country)
        return ClientAddress(peer_ip, "peer", country)

    def _walk(self, values: tuple[str, ...], entry_ip: _EntryParser) -> IPAddress | None:
        """The client named by the forwarding chain, or ``None`` to fall back to the peer."""
        # Commas inside quoted strings are not honoured on purpose: the entries right of the client
        # come from trusted proxies and never quote one, and honouring them would let a client's
        # unbalanced quote swallow the entries its proxies appended.
        leftmost: IPAddress | None = None
        seen = 0
        for value in reversed(values):
            # rsplit bounds the work on a huge header: anything past the cap stays one unread piece.
            for entry in reversed(value.rsplit(",", _MAX_ENTRIES - seen)):
                if seen == _MAX_ENTRIES:
                    return None
                ip = entry_ip(entry)
                if ip is None:
                    return None
                if not self.is_trusted(ip):
                    return ip
                leftmost = ip
                seen += 1
        return leftmost
