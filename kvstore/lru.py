"""LRU by bytes: the one eviction policy of the memory and disk tiers and the prefix cache.

The policy tracks only keys and sizes; its owner keeps the entries and drops the ones `evict`
names. Not thread-safe on its own: owners call it under their lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)


class LRU(Generic[K]):
    """Entry sizes in least-recently-used order, and which entries to evict to fit `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0  # bytes of the entries tracked
        self._sizes: OrderedDict[K, int] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def add(self, key: K, size: int) -> None:
        """A new entry, or a rewrite of one: the most recently used now."""
        self.remove(key)
        self._sizes[key] = size
        self.used += size

    def touch(self, key: K) -> None:
        """An entry was read (no-op if unknown)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def remove(self, key: K) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self.used -= size
        return True

    def evict(self, keep: Optional[K] = None, pinned: Optional[Callable[[K], bool]] = None) -> list[K]:
        """Forget and return the least recently used keys until `used <= capacity`.

        `keep` and pinned keys are never chosen, so with enough of them `used` stays above capacity.
        """
        excess = self.used - self.capacity
        victims: list[K] = []
        for key, size in self._sizes.items():
            if excess <= 0:
                break
            if key != keep and not (pinned is not None and pinned(key)):
                victims.append(key)
                excess -= size
        for key in victims:
            self.remove(key)
        return victims
