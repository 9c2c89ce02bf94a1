"""A bounded least-recently-used cache: the one cache shape of the request path.

Every request-path cache is keyed by validated values (a parsed client address, a location,
a file the catalog lists), never by raw request text, and holds at most ``limit`` entries,
evicting the least recently used one in O(1) (``OrderedDict.popitem``), so a client that sends
endless new keys only cycles the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``limit`` entries; ``get`` marks an entry used, ``put`` evicts the oldest."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.limit = limit

    def get(self, key: K) -> V | None:
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self.limit:
            entries.popitem(last=False)
        return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The cached value, or ``make()`` cached."""
        value = self.get(key)
        return self.put(key, make()) if value is None else value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
