"""Memory tiers: `device` (CUDA memory) and `cpu` (host memory, pinned when CUDA is present)."""

from __future__ import annotations

from typing import Optional

import torch

from kvstore.lru import EvictionPolicy, LRUPolicy
from kvstore.quant import StoredChunk
from kvstore.tier_base import Payload, Pinned, Tier


class MemoryTier(Tier):
    """Stored chunks kept as tensors on one device, evicted by bytes.

    Not thread-safe: TieredStore calls it under its own lock (every operation is a dict update
    or a view), after doing the copy to this tier's device with `prepare` outside the lock.
    """

    def __init__(self, name: str, capacity: int, device: torch.device, pin_memory: bool = False,
                 policy: Optional[EvictionPolicy] = None) -> None:
        super().__init__(capacity)
        self.name = name
        self.device = device
        self.pin_memory = pin_memory
        self._policy = policy or LRUPolicy()
        self._entries: dict[str, StoredChunk] = {}
        self._bytes = 0

    def prepare(self, chunk: StoredChunk) -> StoredChunk:
        """`chunk` on this tier's device (and pinned if configured), ready for `write`."""
        return chunk.to(self.device, self.pin_memory)

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        chunk = self._entries.get(key)
        if chunk is None:
            return None
        self._policy.touch(key)
        nbytes = chunk.nbytes if layers is None else chunk.layers(layers).nbytes
        return chunk, nbytes  # the whole chunk: the store slices it and may promote it

    def contains(self, key: str) -> bool:
        return key in self._entries

    def write(self, key: str, chunk: StoredChunk, pinned: Pinned) -> list[tuple[str, Payload]]:
        chunk = self.prepare(chunk)
        if chunk.nbytes > self.capacity:
            return []  # would evict everything and still not fit
        self.remove(key)
        self._entries[key] = chunk
        self._bytes += chunk.nbytes
        self._policy.add(key)
        self.counters.add(bytes_written=chunk.nbytes)
        victims: list[str] = []
        excess = self._bytes - self.capacity
        for victim in self._policy.victims():
            if excess <= 0:
                break
            if victim != key and not pinned(victim):
                victims.append(victim)
                excess -= self._entries[victim].nbytes
        evicted: list[tuple[str, Payload]] = []
        for victim in victims:
            evicted.append((victim, self._entries[victim]))
            self.remove(victim)
        self.counters.add(evictions=len(victims))
        return evicted

    def remove(self, key: str) -> bool:
        chunk = self._entries.pop(key, None)
        if chunk is None:
            return False
        self._bytes -= chunk.nbytes
        self._policy.remove(key)
        return True

    def items(self) -> list[tuple[str, StoredChunk]]:
        return list(self._entries.items())

    def usage(self) -> tuple[int, int]:
        return self._bytes, len(self._entries)
