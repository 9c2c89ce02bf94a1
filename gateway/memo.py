"""Bounded memo tables for the request path: answers to pure questions whose inputs repeat.

Clients repeat themselves (one client downloads many files, many clients want the same popular
files), so the request path remembers what it worked out from a raw input and asks only a dict
the next time. Every table is bounded: the oldest entry goes first once full, because tracking
recency on every hit would cost more than recomputing a forgotten entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """A dict of at most ``limit`` entries that drops its oldest insert when full."""

    __slots__ = ("_entries", "_limit", "get")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._entries: dict[K, V] = {}
        self._limit = limit
        #: The remembered value, or None. The dict's own method: a lookup costs no Python call,
        #: and the request path makes several per request.
        self.get: Callable[[K], V | None] = self._entries.get

    def put(self, key: K, value: V) -> V:
        entries = self._entries
        if len(entries) >= self._limit and key not in entries:
            del entries[next(iter(entries))]
        entries[key] = value
        return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The remembered value, or ``make()`` remembered."""
        value = self._entries.get(key)
        return self.put(key, make()) if value is None else value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
