from __future__ import annotations

import ipaddress
import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ClientIPConfig, ForwardedHeader
from gateway.geo.clientip import (
    ClientAddress,
    ClientIPResolver,
    ClientIPSource,
    ForwardingHeaders,
    IPAddress,
    parse_ip,
)

TRUSTED = ("10.0.0.0/8", "192.0.2.7", "2001:db8:ff::/48", "2001:db8::7")
CLIENT4 = "203.0.113.9"
CLIENT6 = "2001:db8:aaaa::9"
PROXY4 = "10.0.0.1"
PROXY6 = "2001:db8:ff::1"
GARBAGE = ("unknown", "", "  ", "1.2.3", "999.1.1.1", "_hidden", "::ffff:zz", "\x00", "9" * 200)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def config(
    *trusted: str,
    header: ForwardedHeader = "x-forwarded-for",
    cdn_ip: str | None = None,
    cdn_country: str | None = None,
) -> ClientIPConfig:
    return ClientIPConfig(
        trusted_proxies=tuple(ipaddress.ip_network(net) for net in trusted or TRUSTED),
        forwarded_header=header,
        cdn_client_ip_header=cdn_ip,
        cdn_country_header=cdn_country,
    )


XFF = config()
FWD = config(header="forwarded")
NO_HEADER = config(header="none")
CDN = config(cdn_ip="cf-connecting-ip", cdn_country="cf-ipcountry")


def xff(*lines: str, cdn_ip: str | None = None, country: str | None = None) -> ForwardingHeaders:
    return ForwardingHeaders(forwarded=lines, cdn_client_ip=cdn_ip, cdn_country=country)


def chain(*entries: str) -> str:
    return ", ".join(entries)


# --------------------------------------------------------------------------- parse_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("203.0.113.9", "203.0.113.9", id="ipv4"),
        pytest.param("203.0.113.9:5678", "203.0.113.9", id="ipv4-port"),
        pytest.param("203.0.113.9:0", "203.0.113.9", id="ipv4-port-zero"),
        pytest.param("203.0.113.9:65535", "203.0.113.9", id="ipv4-port-max"),
        pytest.param("2001:db8::1", "2001:db8::1", id="ipv6"),
        pytest.param("2001:DB8:0::0001", "2001:db8::1", id="ipv6-uppercase-uncompressed"),
        pytest.param("[2001:db8::1]", "2001:db8::1", id="ipv6-brackets"),
        pytest.param("[2001:db8::1]:443", "2001:db8::1", id="ipv6-brackets-port"),
        pytest.param("::", "::", id="ipv6-unspecified"),
        pytest.param(" \t203.0.113.9 \r\n", "203.0.113.9", id="surrounding-whitespace"),
        pytest.param('"203.0.113.9"', "203.0.113.9", id="quoted-ipv4"),
        pytest.param(' "[2001:db8:cafe::17]:4711" ', "2001:db8:cafe::17", id="quoted-rfc7239"),
        pytest.param("::ffff:203.0.113.9", "203.0.113.9", id="ipv4-mapped"),
        pytest.param("::FFFF:cb00:7109", "203.0.113.9", id="ipv4-mapped-hex"),
        pytest.param("[::ffff:203.0.113.9]:80", "203.0.113.9", id="ipv4-mapped-brackets-port"),
        pytest.param("fe80::1%eth0", "fe80::1", id="zone-stripped"),
        pytest.param("[fe80::1%25eth0]:8080", "fe80::1", id="zone-stripped-brackets-port"),
        pytest.param("203.0.113.9:_p-1.x", "203.0.113.9", id="rfc7239-obfuscated-port"),
        pytest.param("[2001:db8::1]:_abc", "2001:db8::1", id="rfc7239-obfuscated-port-ipv6"),
    ],
)
def test_parse_ip_accepts(text: str, expected: str) -> None:
    result = parse_ip(text)
    assert result == ip(expected)
    assert type(result) is type(ip(expected))
    assert not isinstance(result, ipaddress.IPv6Address) or result.scope_id is None


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param('""', id="empty-quotes"),
        pytest.param('"', id="lone-quote"),
        pytest.param('"203.0.113.9', id="unbalanced-quote"),
        pytest.param('" 203.0.113.9"', id="whitespace-inside-quotes"),
        pytest.param("unknown", id="unknown"),
        pytest.param("_hidden", id="obfuscated-node"),
        pytest.param("example.com", id="hostname"),
        pytest.param("localhost", id="localhost"),
        pytest.param("1.2.3", id="three-octets"),
        pytest.param("1.2.3.4.5", id="five-octets"),
        pytest.param("999.1.1.1", id="octet-out-of-range"),
        pytest.param("01.2.3.4", id="leading-zero-octet"),
        pytest.param("1.2.3.4/32", id="cidr"),
        pytest.param("\u0661.\u0662.\u0663.\u0664", id="non-ascii-digits"),
        pytest.param("::ffff:zz", id="bad-hextet"),
        pytest.param("2001:db8::1::2", id="double-double-colon"),
        pytest.param("\x00", id="nul"),
        pytest.param("203.0.113.9\x00", id="trailing-nul"),
        pytest.param("203.0.113.9 x", id="trailing-junk"),
        pytest.param("1" * 65, id="over-64-chars"),
        pytest.param("0:0:0:0:0:0:0:" + "0" * 60, id="long-ipv6-like"),
        pytest.param("203.0.113.9:", id="empty-port"),
        pytest.param("203.0.113.9:65536", id="port-out-of-range"),
        pytest.param("203.0.113.9:000080", id="port-too-long"),
        pytest.param("203.0.113.9:http", id="port-name"),
        pytest.param("203.0.113.9:_", id="obfuscated-port-empty"),
        pytest.param("203.0.113.9:_a b", id="obfuscated-port-bad-char"),
        pytest.param("203.0.113.9:80:80", id="two-ports"),
        pytest.param(":80", id="port-only"),
        pytest.param("[203.0.113.9]", id="ipv4-in-brackets"),
        pytest.param("[2001:db8::1", id="unclosed-bracket"),
        pytest.param("2001:db8::1]", id="stray-close-bracket"),
        pytest.param("[2001:db8::1]443", id="port-without-colon"),
        pytest.param("[2001:db8::1]:", id="brackets-empty-port"),
        pytest.param("[]", id="empty-brackets"),
        pytest.param("fe80::1%", id="empty-zone"),
        pytest.param("203.0.113.9%eth0", id="zone-on-ipv4"),
    ],
)
def test_parse_ip_rejects(text: str) -> None:
    assert parse_ip(text) is None


# --------------------------------------------------------------------------- resolve


@pytest.mark.parametrize(
    ("cfg", "peer", "headers", "expected"),
    [
        # Untrusted or non-IP peers: every header is ignored.
        pytest.param(XFF, "198.51.100.4", xff(), ClientAddress(ip("198.51.100.4"), "peer"),
                     id="untrusted-ipv4-peer-no-headers"),
        pytest.param(XFF, "198.51.100.4", xff(CLIENT4), ClientAddress(ip("198.51.100.4"), "peer"),
                     id="untrusted-ipv4-peer-spoofed-xff"),
        pytest.param(XFF, CLIENT6, xff("198.51.100.1"), ClientAddress(ip(CLIENT6), "peer"),
                     id="untrusted-ipv6-peer-spoofed-xff"),
        pytest.param(FWD, "198.51.100.4", xff(f"for={CLIENT4}"),
                     ClientAddress(ip("198.51.100.4"), "peer"),
                     id="untrusted-peer-spoofed-forwarded"),
        pytest.param(CDN, "198.51.100.4", xff(CLIENT4, cdn_ip=CLIENT6, country="DE"),
                     ClientAddress(ip("198.51.100.4"), "peer"),
                     id="untrusted-peer-spoofed-cdn-headers"),
        pytest.param(XFF, "192.0.2.8", xff(CLIENT4), ClientAddress(ip("192.0.2.8"), "peer"),
                     id="peer-next-to-trusted-single-host"),
        pytest.param(XFF, "2001:db8::8", xff(CLIENT4), ClientAddress(ip("2001:db8::8"), "peer"),
                     id="peer-next-to-trusted-ipv6-host"),
        pytest.param(XFF, "2001:db8:100::1", xff(CLIENT4),
                     ClientAddress(ip("2001:db8:100::1"), "peer"),
                     id="peer-just-outside-trusted-ipv6-range"),
        pytest.param(XFF, None, xff(CLIENT4), ClientAddress(None, "peer"), id="no-peer"),
        pytest.param(XFF, "", xff(CLIENT4), ClientAddress(None, "peer"), id="unix-socket-peer"),
        pytest.param(CDN, "proxy.local", xff(CLIENT4, cdn_ip=CLIENT4, country="DE"),
                     ClientAddress(None, "peer"), id="hostname-peer"),
        # Trusted peers of each kind.
        pytest.param(XFF, PROXY4, xff(CLIENT4), ClientAddress(ip(CLIENT4), "x-forwarded-for"),
                     id="trusted-ipv4-cidr-peer"),
        pytest.param(XFF, PROXY6, xff(CLIENT6), ClientAddress(ip(CLIENT6), "x-forwarded-for"),
                     id="trusted-ipv6-cidr-peer"),
        pytest.param(XFF, "192.0.2.7", xff(CLIENT6), ClientAddress(ip(CLIENT6), "x-forwarded-for"),
                     id="trusted-ipv4-single-host-peer"),
        pytest.param(XFF, "2001:db8::7", xff(CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"),
                     id="trusted-ipv6-single-host-peer"),
        pytest.param(XFF, "::ffff:10.1.2.3", xff(CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="ipv4-mapped-trusted-peer"),
        pytest.param(XFF, "::ffff:198.51.100.4", xff(CLIENT4),
                     ClientAddress(ip("198.51.100.4"), "peer"), id="ipv4-mapped-untrusted-peer"),
        pytest.param(ClientIPConfig(), "127.0.0.1", xff(CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="default-config-loopback"),
        pytest.param(ClientIPConfig(), "::1", xff(CLIENT6),
                     ClientAddress(ip(CLIENT6), "x-forwarded-for"),
                     id="default-config-ipv6-loopback"),
        pytest.param(ClientIPConfig(), "::ffff:127.0.0.1", xff(CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"),
                     id="default-config-mapped-loopback"),
        pytest.param(config("::ffff:10.0.0.0/104"), PROXY4, xff(CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="mapped-form-trusted-range"),
        # Chains through several trusted proxies.
        pytest.param(XFF, PROXY4, xff(chain("198.51.100.66", CLIENT4, "10.0.0.3", "10.9.9.9")),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="multi-hop-skips-trusted"),
        pytest.param(XFF, PROXY6,
                     xff(chain("198.51.100.66", CLIENT6, "2001:db8:ff:1::2", "192.0.2.7")),
                     ClientAddress(ip(CLIENT6), "x-forwarded-for"), id="multi-hop-mixed-versions"),
        pytest.param(XFF, PROXY4, xff(chain("10.0.0.5", "2001:db8::7", "10.0.0.3")),
                     ClientAddress(ip("10.0.0.5"), "x-forwarded-for"), id="all-trusted-leftmost"),
        pytest.param(XFF, PROXY4, xff("10.0.0.5"), ClientAddress(ip("10.0.0.5"), "x-forwarded-for"),
                     id="single-trusted-entry"),
        pytest.param(XFF, PROXY4, xff(chain("unknown", CLIENT4, "10.0.0.3")),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"),
                     id="garbage-left-of-client-ignored"),
        pytest.param(XFF, PROXY4, xff(chain(CLIENT4, "unknown", "10.0.0.3")),
                     ClientAddress(ip(PROXY4), "peer"), id="garbage-between-hops-falls-back"),
        pytest.param(XFF, PROXY4, xff(f"{CLIENT4},10.0.0.3"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="no-space-after-comma"),
        pytest.param(XFF, PROXY4, xff(chain("::ffff:203.0.113.9", "::ffff:10.0.0.3")),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="ipv4-mapped-entries"),
        # Ports and brackets.
        pytest.param(XFF, PROXY4, xff(chain(f"{CLIENT4}:5678", "[2001:db8:ff::2]:443")),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="xff-ports-and-brackets"),
        pytest.param(XFF, PROXY4, xff(f"[{CLIENT6}]:443"),
                     ClientAddress(ip(CLIENT6), "x-forwarded-for"), id="xff-bracketed-client"),
        # Repeated header lines form one list, earlier lines further left.
        pytest.param(XFF, PROXY4, xff(chain(CLIENT4, "10.0.0.3"), "10.0.0.2"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"),
                     id="repeated-lines-walk-across"),
        pytest.param(XFF, PROXY4, xff("198.51.100.1", CLIENT4),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="repeated-lines-last-wins"),
        pytest.param(XFF, PROXY4, xff(CLIENT4, "unknown", "10.0.0.2"),
                     ClientAddress(ip(PROXY4), "peer"), id="repeated-lines-garbage-line"),
        pytest.param(XFF, PROXY4, xff(CLIENT4, ""), ClientAddress(ip(PROXY4), "peer"),
                     id="repeated-lines-empty-last-line"),
        pytest.param(XFF, PROXY4, xff(), ClientAddress(ip(PROXY4), "peer"), id="missing-header"),
        pytest.param(XFF, PROXY6, xff(""), ClientAddress(ip(PROXY6), "peer"), id="empty-header"),
        pytest.param(XFF, PROXY4, xff(f"{CLIENT4},"), ClientAddress(ip(PROXY4), "peer"),
                     id="trailing-comma"),
        # forwarded_header: none never reads a chain.
        pytest.param(NO_HEADER, PROXY4, xff(CLIENT4), ClientAddress(ip(PROXY4), "peer"),
                     id="header-none-ignores-chain"),
        pytest.param(config(header="none", cdn_ip="cf-connecting-ip"), PROXY4,
                     xff(CLIENT4, cdn_ip=CLIENT6), ClientAddress(ip(CLIENT6), "cdn-header"),
                     id="header-none-still-reads-cdn"),
        # RFC 7239 Forwarded.
        pytest.param(FWD, PROXY4, xff(f"for={CLIENT4}"), ClientAddress(ip(CLIENT4), "forwarded"),
                     id="forwarded-ipv4"),
        pytest.param(FWD, PROXY4, xff('for="[2001:db8:aaaa::9]:4711"'),
                     ClientAddress(ip(CLIENT6), "forwarded"), id="forwarded-quoted-ipv6-port"),
        pytest.param(FWD, PROXY4, xff(f"proto=https;For={CLIENT4};by=10.0.0.1"),
                     ClientAddress(ip(CLIENT4), "forwarded"), id="forwarded-case-and-params"),
        pytest.param(FWD, PROXY4, xff(f"for={CLIENT4}; proto=https"),
                     ClientAddress(ip(CLIENT4), "forwarded"), id="forwarded-space-after-semicolon"),
        pytest.param(FWD, PROXY4,
                     xff(f"for=198.51.100.1, for={CLIENT4};proto=http, for=10.0.0.2;by=_p1"),
                     ClientAddress(ip(CLIENT4), "forwarded"), id="forwarded-multi-hop"),
        pytest.param(FWD, PROXY4, xff("for=10.0.0.9", 'for="[2001:db8:ff::3]"'),
                     ClientAddress(ip("10.0.0.9"), "forwarded"),
                     id="forwarded-all-trusted-repeated-lines"),
        pytest.param(FWD, PROXY4, xff(f"for={CLIENT4};ext=\"a;b\""),
                     ClientAddress(ip(CLIENT4), "forwarded"), id="forwarded-quoted-semicolon"),
        pytest.param(FWD, PROXY4, xff(f'for="198.51.100.1, for={CLIENT4}'),
                     ClientAddress(ip(CLIENT4), "forwarded"),
                     id="forwarded-unbalanced-quote-cannot-swallow-proxy-entry"),
        pytest.param(FWD, PROXY4, xff(f'for="{CLIENT4},10.0.0.2"'),
                     ClientAddress(ip(PROXY4), "peer"), id="forwarded-quoted-comma-is-garbage"),
        pytest.param(FWD, PROXY4, xff("proto=https;by=10.0.0.1"),
                     ClientAddress(ip(PROXY4), "peer"), id="forwarded-without-for"),
        pytest.param(FWD, PROXY4, xff(CLIENT4), ClientAddress(ip(PROXY4), "peer"),
                     id="forwarded-bare-address"),
        pytest.param(FWD, PROXY4, xff("for=unknown"), ClientAddress(ip(PROXY4), "peer"),
                     id="forwarded-unknown"),
        pytest.param(FWD, PROXY4, xff('for="_gazonk"'), ClientAddress(ip(PROXY4), "peer"),
                     id="forwarded-obfuscated"),
        pytest.param(FWD, PROXY4, xff("for="), ClientAddress(ip(PROXY4), "peer"),
                     id="forwarded-empty-for"),
        pytest.param(FWD, PROXY4, xff(f"for={CLIENT4}, for=_hidden, for=10.0.0.2"),
                     ClientAddress(ip(PROXY4), "peer"), id="forwarded-garbage-between-hops"),
        # CDN client-IP header.
        pytest.param(CDN, PROXY4, xff(CLIENT4, cdn_ip="198.51.100.50"),
                     ClientAddress(ip("198.51.100.50"), "cdn-header"), id="cdn-ip-wins-over-xff"),
        pytest.param(CDN, PROXY4, xff(cdn_ip=f" [{CLIENT6}]:443 "),
                     ClientAddress(ip(CLIENT6), "cdn-header"), id="cdn-ip-bracketed-ipv6"),
        pytest.param(CDN, PROXY4, xff(CLIENT4, cdn_ip="unknown"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="cdn-ip-garbage-uses-xff"),
        pytest.param(CDN, PROXY4, xff(CLIENT4, cdn_ip=chain("198.51.100.50", "10.0.0.1")),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="cdn-ip-list-is-garbage"),
        pytest.param(CDN, PROXY4, xff(cdn_ip=""), ClientAddress(ip(PROXY4), "peer"),
                     id="cdn-ip-empty-uses-peer"),
        pytest.param(XFF, PROXY4, xff(CLIENT4, cdn_ip="198.51.100.50"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="cdn-ip-not-configured"),
        # cdn_country travels with whichever source won, but only behind a trusted peer.
        pytest.param(CDN, PROXY4, xff(CLIENT4, country="de"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for", "DE"), id="country-with-xff"),
        pytest.param(CDN, PROXY4, xff(cdn_ip=CLIENT6, country="JP"),
                     ClientAddress(ip(CLIENT6), "cdn-header", "JP"), id="country-with-cdn-ip"),
        pytest.param(CDN, PROXY4, xff(country="FR"), ClientAddress(ip(PROXY4), "peer", "FR"),
                     id="country-with-peer-fallback"),
        pytest.param(XFF, PROXY4, xff(CLIENT4, country="DE"),
                     ClientAddress(ip(CLIENT4), "x-forwarded-for"), id="country-not-configured"),
    ],
)  # fmt: skip
def test_resolve(
    cfg: ClientIPConfig, peer: str | None, headers: ForwardingHeaders, expected: ClientAddress
) -> None:
    assert ClientIPResolver(cfg).resolve(peer, headers) == expected


@pytest.mark.parametrize("entry", [pytest.param(g, id=repr(g)[:20]) for g in GARBAGE])
@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
def test_garbage_before_client_falls_back_to_peer(entry: str, header: ForwardedHeader) -> None:
    prefix = "for=" if header == "forwarded" else ""
    value = chain(*(prefix + e for e in (CLIENT4, entry, "10.0.0.2")))
    result = ClientIPResolver(config(header=header)).resolve(PROXY4, xff(value))
    assert result == ClientAddress(ip(PROXY4), "peer")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("US", "US", id="upper"),
        pytest.param("us", "US", id="lower"),
        pytest.param("gB", "GB", id="mixed-case"),
        pytest.param(" de\t", "DE", id="whitespace"),
        pytest.param("XX", None, id="placeholder-unknown"),
        pytest.param("xx", None, id="placeholder-unknown-lower"),
        pytest.param("EU", None, id="placeholder-europe"),
        pytest.param("ap", None, id="placeholder-asia-pacific"),
        pytest.param("T1", None, id="placeholder-tor"),
        pytest.param("A1", None, id="placeholder-anonymous-proxy"),
        pytest.param("A2", None, id="placeholder-satellite"),
        pytest.param("O1", None, id="placeholder-other"),
        pytest.param("", None, id="empty"),
        pytest.param("U", None, id="one-letter"),
        pytest.param("USA", None, id="three-letters"),
        pytest.param("U S", None, id="inner-space"),
        pytest.param("1A", None, id="digit"),
        pytest.param("\u00c4\u00d6", None, id="non-ascii-letters"),
        pytest.param("\u00df", None, id="sharp-s-uppercases-to-two-letters"),
        pytest.param("u\x00", None, id="nul"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_cdn_country(value: str | None, expected: str | None) -> None:
    result = ClientIPResolver(CDN).resolve(PROXY4, xff(CLIENT4, country=value))
    assert result == ClientAddress(ip(CLIENT4), "x-forwarded-for", expected)


TRUSTED_HOPS = tuple(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(70))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param((chain(CLIENT4, *TRUSTED_HOPS[:63]),), CLIENT4, id="client-at-entry-64"),
        pytest.param((chain(CLIENT4, *TRUSTED_HOPS[:64]),), PROXY4, id="client-at-entry-65"),
        pytest.param((chain(*TRUSTED_HOPS[:64]),), TRUSTED_HOPS[0], id="64-trusted-leftmost"),
        pytest.param((chain(*TRUSTED_HOPS[:65]),), PROXY4, id="65-trusted"),
        pytest.param((chain(*TRUSTED_HOPS[:32]), chain(*TRUSTED_HOPS[32:64])), TRUSTED_HOPS[0],
                     id="64-trusted-over-two-lines"),
        pytest.param((chain(*TRUSTED_HOPS[:32]), chain(*TRUSTED_HOPS[32:65])), PROXY4,
                     id="65-trusted-over-two-lines"),
        pytest.param((*TRUSTED_HOPS[:64], CLIENT4), CLIENT4, id="many-lines-client-rightmost"),
        pytest.param((*TRUSTED_HOPS[:64], ""), PROXY4, id="many-lines-empty-rightmost"),
        pytest.param((CLIENT4, *TRUSTED_HOPS[:64]), PROXY4, id="client-on-line-65"),
        pytest.param((chain("unknown", *TRUSTED_HOPS[:64]),), PROXY4, id="garbage-past-cap"),
        pytest.param((chain(*(["10.0.0.3"] * 100_000)),), PROXY4, id="huge-header"),
        pytest.param((chain(*(["unknown"] * 100_000), CLIENT4),), CLIENT4,
                     id="huge-header-client-rightmost"),
    ],
)  # fmt: skip
def test_chain_cap(lines: tuple[str, ...], expected: str) -> None:
    result = ClientIPResolver(XFF).resolve(PROXY4, xff(*lines))
    source: ClientIPSource = "peer" if expected == PROXY4 else "x-forwarded-for"
    assert result == ClientAddress(ip(expected), source)


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        pytest.param("10.0.0.0", True, id="ipv4-network-start"),
        pytest.param("10.255.255.255", True, id="ipv4-network-end"),
        pytest.param("11.0.0.0", False, id="ipv4-after-network"),
        pytest.param("192.0.2.7", True, id="ipv4-single-host"),
        pytest.param("192.0.2.6", False, id="ipv4-beside-single-host"),
        pytest.param("2001:db8:ff:ffff::1", True, id="ipv6-network"),
        pytest.param("2001:db8:100::", False, id="ipv6-after-network"),
        pytest.param("2001:db8::7", True, id="ipv6-single-host"),
        pytest.param("::a00:1", False, id="ipv6-with-ipv4-bits-is-not-ipv4"),
    ],
)
def test_is_trusted(address: str, trusted: bool) -> None:
    assert ClientIPResolver(XFF).is_trusted(ip(address)) is trusted


def test_no_trusted_proxies_trusts_nobody() -> None:
    resolver = ClientIPResolver(ClientIPConfig(trusted_proxies=()))
    assert resolver.resolve("127.0.0.1", xff(CLIENT4)) == ClientAddress(ip("127.0.0.1"), "peer")


# --------------------------------------------------------------------------- properties

_TRUSTED_NETWORKS = tuple(ipaddress.ip_network(net) for net in TRUSTED)

_addresses = st.one_of(
    st.ip_addresses(),
    *(st.ip_addresses(network=net) for net in _TRUSTED_NETWORKS),
)


@st.composite
def _address_tokens(draw: st.DrawFn) -> str:
    address = draw(_addresses)
    text = draw(st.sampled_from([str(address), address.exploded, str(address).upper()]))
    if address.version == 4 and draw(st.booleans()):
        text = "::ffff:" + text
    if ":" in text and draw(st.booleans()):
        text = f"[{text}]"
    if draw(st.booleans()):
        text += ":" + str(draw(st.integers(0, 65535)))
    return f'"{text}"' if draw(st.booleans()) else text


_tokens = st.one_of(
    _address_tokens(),
    st.sampled_from([*GARBAGE, "for=", '"', ";", "[", "]", "%", "for=unknown"]),
    st.text(max_size=12),
)


@st.composite
def _header_values(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["", "for="]))
    tokens = draw(st.lists(_tokens, max_size=8))
    # A chain that ends in an address reaches the walk's interesting branches far more often.
    tokens += draw(st.lists(_address_tokens(), max_size=1))
    structured = ",".join(prefix + t for t in tokens)
    return draw(st.one_of(st.just(structured), st.text()))


_configs = st.builds(
    ClientIPConfig,
    trusted_proxies=st.sampled_from([_TRUSTED_NETWORKS, _TRUSTED_NETWORKS[:2]]),
    forwarded_header=st.sampled_from(["x-forwarded-for", "forwarded", "none"]),
    cdn_client_ip_header=st.sampled_from([None, "cf-connecting-ip"]),
    cdn_country_header=st.sampled_from([None, "cf-ipcountry"]),
)
_headers = st.builds(
    ForwardingHeaders,
    forwarded=st.lists(_header_values(), max_size=3).map(tuple),
    cdn_client_ip=st.one_of(st.none(), _tokens, st.text()),
    cdn_country=st.one_of(st.none(), st.sampled_from(["us", "XX", " de "]), st.text(max_size=3)),
)


def _named_addresses(text: str) -> set[IPAddress]:
    """Every address a token of ``text`` could spell, whatever the header syntax."""
    return {a for token in re.split(r"[\s,;=]+", text) if (a := parse_ip(token)) is not None}


@given(cfg=_configs, peer=st.one_of(st.none(), st.text(), _address_tokens()), headers=_headers)
def test_untrusted_peer_is_the_client(
    cfg: ClientIPConfig, peer: str | None, headers: ForwardingHeaders
) -> None:
    result = ClientIPResolver(cfg).resolve(peer, headers)
    peer_ip = parse_ip(peer) if peer is not None else None
    if peer_ip is None or not any(peer_ip in net for net in cfg.trusted_proxies):
        assert result == ClientAddress(peer_ip, "peer")


@settings(max_examples=400)  # few random chains name a client; give those cases a chance
@given(cfg=_configs, peer=st.sampled_from([PROXY4, PROXY6, "::ffff:10.0.0.1"]), headers=_headers)
def test_trusted_peer_client_comes_from_the_headers(
    cfg: ClientIPConfig, peer: str, headers: ForwardingHeaders
) -> None:
    result = ClientIPResolver(cfg).resolve(peer, headers)
    if result.source == "peer":
        assert result.ip == parse_ip(peer)
    elif result.source == "cdn-header":
        assert cfg.cdn_client_ip_header is not None
        assert headers.cdn_client_ip is not None
        assert result.ip == parse_ip(headers.cdn_client_ip)
    else:
        assert result.source == cfg.forwarded_header
        assert result.ip in _named_addresses(",".join(headers.forwarded))
    if result.cdn_country is not None:
        assert cfg.cdn_country_header is not None
        assert headers.cdn_country is not None
        assert result.cdn_country == headers.cdn_country.strip().upper()
        assert re.fullmatch("[A-Z]{2}", result.cdn_country)


_CHAIN_POOL = ("10.0.0.3", "10.9.9.9", "2001:db8:ff::2", CLIENT4, CLIENT6, "unknown", "")


@st.composite
def _xff_lines(draw: st.DrawFn) -> tuple[str, ...]:
    entries = draw(
        st.one_of(
            st.lists(st.sampled_from(_CHAIN_POOL), max_size=12),
            st.builds(
                list.__add__,
                st.lists(st.sampled_from(_CHAIN_POOL), max_size=3),
                st.lists(st.sampled_from(_CHAIN_POOL[:3]), min_size=60, max_size=70),
            ),
        )
    )
    cuts = sorted(draw(st.sets(st.integers(0, len(entries)), max_size=3)))
    bounds = [0, *cuts, len(entries)]
    return tuple(", ".join(entries[a:b]) for a, b in pairwise(bounds) if a < b)


def _reference_walk(lines: tuple[str, ...]) -> IPAddress | None:
    """The walk as specified, with none of the implementation's shortcuts."""
    entries = ",".join(lines).split(",")[::-1] if lines else []
    for entry in entries[:64]:
        address = parse_ip(entry)
        if address is None:
            return None
        if not any(address in net for net in _TRUSTED_NETWORKS):
            return address
    if not entries or len(entries) > 64:
        return None
    return parse_ip(entries[-1])


@given(lines=_xff_lines())
def test_walk_matches_reference(lines: tuple[str, ...]) -> None:
    client = _reference_walk(lines)
    expected = (
        ClientAddress(ip(PROXY4), "peer")
        if client is None
        else ClientAddress(client, "x-forwarded-for")
    )
    assert ClientIPResolver(XFF).resolve(PROXY4, xff(*lines)) == expected
