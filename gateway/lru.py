"""A bounded least-recently-used cache: the one cache shape of the request path.

Every request-path cache is keyed by validated values (a parsed client address, a location,
a file the catalog lists), never by raw request text, and is bounded: at most ``limit``
entries, or entries whose weights (``weigh``, for values of very different sizes) add up to
at most ``limit``. The least recently used entries go first, in O(1) each
(``OrderedDict.popitem``), so a client that sends endless new keys only cycles the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``limit`` entries, or entries of at most ``limit`` total weight with ``weigh``
    (a value's weight must not change while it is cached); ``get`` marks an entry used,
    ``put`` evicts the oldest, keeping at least the entry it puts."""

    __slots__ = ("_entries", "_weigh", "limit", "weight")

    def __init__(self, limit: int, weigh: Callable[[V], int] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._weigh = weigh
        self.limit = limit
        #: The entries' total weight (their count without ``weigh``).
        self.weight = 0

    def get(self, key: K) -> V | None:
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        entries, weigh = self._entries, self._weigh
        if weigh is None:
            entries[key] = value
            entries.move_to_end(key)
            if len(entries) > self.limit:
                entries.popitem(last=False)
            self.weight = len(entries)
            return value
        replaced = entries.pop(key, None)
        if replaced is not None:
            self.weight -= weigh(replaced)
        entries[key] = value
        self.weight += weigh(value)
        while self.weight > self.limit and len(entries) > 1:
            self.weight -= weigh(entries.popitem(last=False)[1])
        return value

    def peek(self, key: K) -> V | None:
        """The cached value, without marking it used."""
        return self._entries.get(key)

    def newest_first(self) -> list[tuple[K, V]]:
        """Every entry, most recently used first."""
        return list(reversed(self._entries.items()))

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The cached value, or ``make()`` cached."""
        value = self.get(key)
        return self.put(key, make()) if value is None else value

    def clear(self) -> None:
        self._entries.clear()
        self.weight = 0

    def __len__(self) -> int:
        return len(self._entries)
