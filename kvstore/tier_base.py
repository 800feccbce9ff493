"""What every tier shares: counters, and read bookkeeping (hits, misses, corruption)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Union

from kvstore import serialize
from kvstore.quant import StoredChunk
from kvstore.serialize import CorruptBlob

log = logging.getLogger(__name__)

# An evicted entry on its way to the next tier down: decoded (memory tiers) or as the file's bytes.
Payload = Union[StoredChunk, bytes]
Pinned = Callable[[str], bool]

COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions", "corrupt", "errors", "load_seconds")


class TierCounters:
    """Monotonic per-tier counters; see the kvstore package docstring for their meaning."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {name: 0 for name in COUNTERS}
        self._values["load_seconds"] = 0.0

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class Tier:
    """Base of all tiers. Subclasses implement `_read`, `contains`, `write`, `remove`."""

    name: str = ""
    shared: bool = False  # seen by other store instances (Redis, S3)

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # bytes; 0 for remote tiers, whose size is not tracked
        self.counters = TierCounters()

    def read(self, key: str, layers: Optional[range]) -> Optional[StoredChunk]:
        """A chunk covering at least `layers` (all if None) of `key`, or None on a miss.

        A corrupt blob is removed from this tier, counted as corrupt, and read as a miss.
        """
        start = time.perf_counter()
        try:
            found = self._read(key, layers)
        except CorruptBlob as e:
            log.warning("%s tier: dropping corrupt chunk %s: %s", self.name, key, e)
            self.remove(key)
            self.counters.add(corrupt=1, misses=1)
            return None
        if found is None:
            self.counters.add(misses=1)
            return None
        chunk, nbytes = found
        self.counters.add(hits=1, bytes_read=nbytes, load_seconds=time.perf_counter() - start)
        return chunk

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        raise NotImplementedError

    def contains(self, key: str) -> bool:
        raise NotImplementedError

    def write(self, key: str, chunk: StoredChunk, pinned: Pinned) -> list[tuple[str, Payload]]:
        """Store a whole chunk; returns the entries evicted to make room (never pinned ones)."""
        raise NotImplementedError

    def remove(self, key: str) -> bool:
        raise NotImplementedError

    def usage(self) -> tuple[int, int]:
        """(bytes used, entries); (0, 0) where not tracked."""
        return 0, 0

    def stats(self) -> dict[str, float]:
        out = self.counters.snapshot()
        used, entries = self.usage()
        out.update(bytes_used=used, capacity=self.capacity, entries=entries)
        return out

    def close(self) -> None:
        pass


class SharedTier(Tier):
    """A remote tier other store instances see; it stores serialized chunks and never evicts."""

    shared = True

    def __init__(self) -> None:
        super().__init__(0)

    def write(self, key: str, chunk: StoredChunk, pinned: Pinned) -> list[tuple[str, Payload]]:
        self.write_bytes(key, serialize.to_bytes(key, chunk))
        return []

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store a serialized chunk (skipping it, or failing quietly, is allowed)."""
        raise NotImplementedError
