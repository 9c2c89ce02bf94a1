"""Start-up checks: what ``serve`` needs before it binds, run where a failure can still be told.

A worker that cannot start (GeoIP database unreadable, port taken) would otherwise die in its
own process, and the supervisor would only see it exit and start another. So the supervisor
runs these checks before it starts any worker, ``serve`` runs them with one worker, and
``check-config`` runs the ones that do not bind. Every failure names the key or resource.
"""

from __future__ import annotations

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


def check_listen(key: str, host: str, port: int) -> None:
    """Bind ``host:port`` once, as the listener will, and let it go.

    Without ``SO_REUSEPORT``: the workers share their port with each other, never with a
    process already listening there.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PreflightError(f"{key}: cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's listener does: a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(key, host, port, exc) from None


def listen_error(key: str, host: str, port: int, exc: OSError) -> PreflightError:
    """The one-line error for a listener that cannot bind (port taken, address not ours)."""
    reason = (exc.strerror or type(exc).__name__).lower()
    return PreflightError(f"{key}: cannot listen on {host}:{port}: {reason}")


def check_listeners(config: GatewayConfig, host: str, port: int) -> None:
    """Bind-test the serving port and, when it has its own, the metrics port."""
    check_listen("server.port", host, port)
    metrics = config.metrics
    if metrics.enabled and metrics.port is not None:
        check_listen("metrics.port", metrics.host, metrics.port)
