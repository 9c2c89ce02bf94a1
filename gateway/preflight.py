"""Start-up checks: what ``serve`` needs before it binds, run where a failure can still be told.

A worker that cannot start (GeoIP database unreadable, port taken) would otherwise die in its
own process, and the supervisor would only see it exit and start another. So the supervisor
runs these checks before it starts any worker, ``serve`` runs them with one worker, and
``check-config`` runs the ones that do not bind. Every failure names the key or resource.
"""

from __future__ import annotations

import errno
import socket

from gateway.config import GatewayConfig
from gateway.geo.locator import MaxMindLocator


class PreflightError(Exception):
    """Something ``serve`` needs is unusable; the message names the key or resource."""


def check_resources(config: GatewayConfig) -> tuple[str, ...]:
    """Open every file the config names (GeoIP databases) as ``serve`` does; return the
    warnings ``serve`` would log.

    Raises ``GeoDataError`` naming the key when the City database cannot be used. URLs and
    every other value were checked when the config was loaded.
    """
    locator = MaxMindLocator(config.geoip)
    locator.close()
    return locator.warnings


def check_listen(section: str, host: str, port: int) -> None:
    """Bind ``host:port`` once, as the listener will, and let it go (``section``: the config
    section of the listener, ``server`` or ``metrics``).

    Without ``SO_REUSEPORT``: the workers share their port with each other, never with a
    process already listening there.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_error(section, host, port, exc) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's listener does: a port in TIME_WAIT is free, and an IPv6 address
            # does not claim the IPv4 one beside it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(section, host, port, exc) from None


def listen_error(section: str, host: str, port: int, exc: OSError) -> PreflightError:
    """The one-line error for a listener that cannot bind, naming the key to change: the port
    when it is taken or privileged, else the host (not an address of this machine, no such
    name)."""
    key = "port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
    reason = (exc.strerror or type(exc).__name__).lower()
    return PreflightError(f"{section}.{key}: cannot listen on {host}:{port}: {reason}")


def check_listeners(config: GatewayConfig, host: str, port: int) -> None:
    """Bind-test the serving port and, when it has its own, the metrics port."""
    check_listen("server", host, port)
    metrics = config.metrics
    if metrics.enabled and metrics.port is not None:
        check_listen("metrics", metrics.host, metrics.port)
