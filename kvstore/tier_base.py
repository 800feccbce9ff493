"""The tier interface, what every tier shares (counters, read bookkeeping), and Payload.

A tier is one place chunks are kept. TieredStore sees every tier through this interface and
its three traits only, so a new kind of tier (a second disk, an NFS path) is one subclass.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from kvstore import serialize
from kvstore.quant import StoredChunk
from kvstore.serialize import CorruptBlob

log = logging.getLogger(__name__)

COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions", "corrupt", "errors", "load_seconds")


class Payload:
    """A whole chunk on its way into a tier, as a StoredChunk, its serialized bytes, or both.

    Each form is made at most once, when a tier first asks for it: a put written to disk,
    Redis and S3 is serialized once, and a file evicted to Redis is never decoded.
    """

    def __init__(self, key: str, chunk: Optional[StoredChunk] = None, data: Optional[bytes] = None) -> None:
        assert chunk is not None or data is not None
        self.key = key
        self._chunk = chunk
        self._data = data

    @property
    def chunk(self) -> StoredChunk:
        """The chunk; CorruptBlob if it came as bytes that fail their checks."""
        if self._chunk is None:
            assert self._data is not None
            self._chunk = serialize.from_bytes(self.key, self._data)[0]
        return self._chunk

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = serialize.to_bytes(self.key, self.chunk)
        return self._data


Pinned = Callable[[str], bool]
OnEvict = Callable[[Payload], None]


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
    """One tier. Subclasses implement `_read`, `contains`, `write`, `remove` (volatile ones
    `items`; tracked ones `usage`) and set the traits. A lazy tier answers a layer-range read
    with only those layers; the store sees that from the chunk (`is_whole`), not from a trait.

    Every method is thread-safe. A tier may call `pinned` and `on_evict` under its own lock,
    so those must never call back into a tier.
    """

    # Traits the store reads (kvstore/policy.py decides copies from the first two):
    volatile = False    # contents die with the process: write-back mode persists them on flush
    shared = False      # other store instances see it: it gets every put and promotion
    slow_write = True   # a write waits on I/O: the store runs it on its background writer

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
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
        """(chunk, bytes read) or None; may raise CorruptBlob. A lazy tier reads only `layers`."""
        raise NotImplementedError

    def contains(self, key: str) -> bool:
        raise NotImplementedError

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        """Store a whole chunk, evicting least recently used entries that are not pinned.

        Each evicted entry is handed to `on_evict` (when given) before it stops being readable
        here, so a reader never misses a chunk on its way down. Raises on failure.
        """
        raise NotImplementedError

    def remove(self, key: str) -> bool:
        raise NotImplementedError

    def items(self) -> list[tuple[str, StoredChunk]]:
        """Every entry; volatile tiers only (the store persists them on a write-back flush)."""
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

    def __init__(self, name: str) -> None:
        super().__init__(name, 0)

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        self.write_bytes(key, payload.data)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store a serialized chunk (skipping it, or failing quietly, is allowed)."""
        raise NotImplementedError
