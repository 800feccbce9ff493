"""Memory tiers: `device` (CUDA memory) and `cpu` (host memory, pinned when CUDA is present)."""

from __future__ import annotations

import threading
from typing import Optional

import torch

from kvstore.lru import LRU
from kvstore.quant import StoredChunk
from kvstore.tier_base import OnEvict, Payload, Pinned, Tier


class MemoryTier(Tier):
    """Stored chunks kept as tensors on one device, evicted by bytes (LRU)."""

    volatile = True
    slow_write = False

    def __init__(self, name: str, capacity: int, device: torch.device, pin_memory: bool = False) -> None:
        super().__init__(name, capacity)
        self.device = device
        self.pin_memory = pin_memory
        self._entries: dict[str, StoredChunk] = {}
        self._lru: LRU[str] = LRU(capacity)
        self._lock = threading.Lock()

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        with self._lock:
            chunk = self._entries.get(key)
            if chunk is None:
                return None
            self._lru.touch(key)
        nbytes = chunk.nbytes if layers is None else chunk.layers(layers).nbytes
        return chunk, nbytes  # the whole chunk: the store slices it and may promote it

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        chunk = payload.chunk.to(self.device, self.pin_memory)  # the copy, outside the lock
        if chunk.nbytes > self.capacity:
            return  # would evict everything and still not fit
        with self._lock:
            self._entries[key] = chunk
            self._lru.add(key, chunk.nbytes)
            victims = self._lru.evict(keep=key, pinned=pinned)
            for victim in victims:
                evicted = self._entries.pop(victim)
                if on_evict is not None:
                    on_evict(Payload(victim, evicted))
        self.counters.add(bytes_written=chunk.nbytes, evictions=len(victims))

    def remove(self, key: str) -> bool:
        with self._lock:
            self._lru.remove(key)
            return self._entries.pop(key, None) is not None

    def items(self) -> list[tuple[str, StoredChunk]]:
        with self._lock:
            return list(self._entries.items())

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return self._lru.used, len(self._entries)
