"""Connection caps: how many client connections one worker holds, in total and per address.

Each connection holds a file descriptor and a few kilobytes whether or not it ever sends a
request. Past a cap a new connection is closed as soon as it is accepted, so the clients already
connected keep being served; the refusal is counted and logged, one summary line per
``REPORT_INTERVAL_S`` however many there were.

The total cap is lowered at start to what the open-file limit leaves room for: a worker that ran
out of descriptors could not accept at all (libuv then accepts and drops every pending connection
without a word) and could not open connections to upstream or Redis either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence

from gateway.config import IPNetwork, ServerConfig
from gateway.metrics import Refusal
from gateway.ratelimit import client_key

log = logging.getLogger("gateway.server")

#: Descriptors kept for everything but client connections: upstream and catalog sessions (up to
#: 100 connections each, aiohttp's default), Redis, probes, GeoIP and log files.
RESERVED_FDS = 256
#: Refusals are logged at most once per this long (a summary of what came in between).
REPORT_INTERVAL_S = 10.0


def open_file_room(wanted: int) -> int:
    """Client connections the open-file limit allows, after raising its soft limit toward
    ``wanted`` + ``RESERVED_FDS`` as far as the hard limit lets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted
    # Never less than half the limit: a small limit still serves, with a thinner reserve.
    return max(soft - RESERVED_FDS, soft // 2)


class _RefusalReport:
    """Refusals logged as one line per ``REPORT_INTERVAL_S``: the first at once, the rest summed."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._pending: Counter[str] = Counter()
        self._last_peer: dict[str, str] = {}
        self._next_report = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, reason: Refusal, peer: str) -> None:
        self._pending[reason] += 1
        self._last_peer[reason] = peer
        now = self._clock()
        if now >= self._next_report:
            self._report(now)
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._next_report - now, self._report_pending)

    def _report_pending(self) -> None:
        self._timer = None
        if self._pending:
            self._report(self._clock())

    def _report(self, now: float) -> None:
        counts = ", ".join(
            f"{count} by {reason} (last from {self._last_peer[reason]})"
            for reason, count in sorted(self._pending.items())
        )
        log.warning("refused new connections: %s", counts)
        self._pending.clear()
        self._next_report = now + REPORT_INTERVAL_S


class ConnectionLimits:
    """Counts the open client connections; ``admit`` says whether a new one may stay.

    Addresses in ``exempt`` (the trusted proxies: every client behind them shares their address)
    are held to the total cap only.
    """

    def __init__(
        self,
        max_connections: int,
        max_per_ip: int,
        exempt: Sequence[IPNetwork],
        on_refused: Callable[[Refusal], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self._max_per_ip = max_per_ip
        self._exempt = tuple(exempt)
        self._on_refused = on_refused
        self._report = _RefusalReport(clock)
        self._open = 0
        #: Open connections per client key; keys leave at zero, so at most ``_open`` of them.
        self._per_ip: dict[str, int] = {}

    @classmethod
    def for_server(
        cls,
        server: ServerConfig,
        trusted_proxies: Sequence[IPNetwork],
        on_refused: Callable[[Refusal], None],
    ) -> ConnectionLimits:
        """The caps of ``server``, the total lowered to fit the open-file limit (said once)."""
        room = open_file_room(server.max_connections)
        if room < server.max_connections:
            log.warning(
                "server.max_connections lowered from %d to %d: the open-file limit (ulimit -n) "
                "is %d and %d descriptors are kept for upstream, Redis and files",
                server.max_connections,
                room,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                RESERVED_FDS,
            )
        return cls(
            min(room, server.max_connections),
            server.max_connections_per_ip,
            trusted_proxies,
            on_refused,
        )

    def _key(self, peer: str | None) -> str | None:
        """The per-address key of ``peer``; None when it is exempt or not an IP (a Unix socket)."""
        if peer is None:
            return None
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return None
        if any(ip in network for network in self._exempt):
            return None
        return client_key(ip)

    def admit(self, peer: str | None) -> str | None:
        """Count in a new connection from ``peer`` and return the key to ``release`` it with;
        raise ``Refused`` (the refusal counted and reported) when it must be closed."""
        key = self._key(peer)
        reason: Refusal | None = None
        if self._open >= self.max_connections:
            reason = "max_connections"
        elif key is not None and self._per_ip.get(key, 0) >= self._max_per_ip:
            reason = "max_connections_per_ip"
        if reason is not None:
            self._on_refused(reason)
            self._report.add(reason, peer or "-")
            raise Refused(reason)
        self._open += 1
        if key is not None:
            self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return key

    def release(self, key: str | None) -> None:
        """A connection ``admit`` let in has closed."""
        self._open -= 1
        if key is not None:
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]


class Refused(Exception):
    """A new connection over a cap; ``reason`` names it."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason)
        self.reason = reason
