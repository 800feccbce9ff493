"""Eviction policies: the order in which a tier gives up entries when it needs room.

A policy only orders keys; the tier owns sizes and decides how many victims it needs.
Policies are not thread-safe on their own: tiers call them under their lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Protocol


class EvictionPolicy(Protocol):
    def add(self, key: str) -> None:
        """A new entry (or a rewrite of one) is in the tier."""

    def touch(self, key: str) -> None:
        """An entry was read."""

    def remove(self, key: str) -> None:
        """An entry left the tier (no-op if unknown)."""

    def victims(self) -> Iterator[str]:
        """Keys in the order they should be evicted, first victim first.

        The tier must not add or remove keys while it iterates.
        """


class LRUPolicy:
    """Least recently used (read or written) first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(self._order)
