"""Failed attempts counted per client in fixed windows, in bounded memory.

Used for the admin token: a client that presented ``max_failures`` wrong tokens within
``window_s`` is refused (429 with ``Retry-After``) until its window ends, whatever it sends, so
guessing the token costs a window per few guesses. Clients are keyed by address, IPv6 by /64
(one subscriber's usual allocation), and at most ``max_clients`` are remembered: a flood of
new addresses evicts the oldest entries, never grows memory.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.lru import LRUCache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Clients remembered at once (two floats and a key each).
MAX_CLIENTS = 10_000
_IPV6_SUBSCRIBER_PREFIX = 64


class _Window(NamedTuple):
    started: float
    failures: int


def client_key(ip: IPAddress | None) -> str:
    """One address for IPv4; the /64 for IPv6, where one client may hold a whole prefix."""
    if ip is None:
        return "-"
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, _IPV6_SUBSCRIBER_PREFIX), strict=False))
    return str(ip)


class FailureLimiter:
    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window_s = window_s
        self._clock = clock
        self._windows: LRUCache[str, _Window] = LRUCache(max_clients)

    def _current(self, client: str, now: float) -> _Window | None:
        window = self._windows.get(client)
        if window is None or now - window.started >= self._window_s:
            return None
        return window

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again, or None when it may try now."""
        now = self._clock()
        window = self._current(client, now)
        if window is None or window.failures < self._max_failures:
            return None
        return max(1, math.ceil(window.started + self._window_s - now))

    def failed(self, client: str) -> None:
        now = self._clock()
        window = self._current(client, now) or _Window(now, 0)
        self._windows.put(client, window._replace(failures=window.failures + 1))

    def __len__(self) -> int:
        return len(self._windows)
