"""Disk tier: one safetensors file per chunk under a folder, evicted by bytes (LRU).

Files live where `keys.shard_path` puts them (suffix `.safetensors`). Writes are atomic (see
atomic.py), so a failed or interrupted write never leaves a file a read would serve. On start
the index is rebuilt from the folder: temp files of interrupted writes are deleted, sizes
read, and LRU order taken from mtimes (a read touches the file's mtime, so the order
survives restarts). Blobs are checked when read, not at start. One process owns a folder.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from kvstore import serialize
from kvstore.atomic import atomic_write, remove_temp_files
from kvstore.keys import shard_files, shard_path
from kvstore.lru import LRU
from kvstore.quant import StoredChunk
from kvstore.tier_base import OnEvict, Payload, Pinned, Tier

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class DiskTier(Tier):
    """Chunks as files under `root`; layer-range reads touch only those layers' tensors."""

    def __init__(self, root: Path, capacity: int, name: str = "disk") -> None:
        super().__init__(name, capacity)
        self.root = Path(root)
        self._lru: LRU[str] = LRU(capacity)
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(self.root)
        if removed:
            log.info("%s tier: removed %d temp files of interrupted writes", name, removed)
        self._scan()

    def path(self, key: str) -> Path:
        return shard_path(self.root, key, SUFFIX)

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []  # (mtime_ns, key, size)
        for key, path in shard_files(self.root, SUFFIX):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._lru.add(key, size)
        for key in self._lru.evict():  # a smaller capacity than last run: drop the oldest files
            self.path(key).unlink(missing_ok=True)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        with self._lock:
            if key not in self._lru:
                return None
            self._lru.touch(key)
        path = self.path(key)
        try:
            found = serialize.read_file(key, path, layers)
        except FileNotFoundError:  # removed behind our back
            with self._lock:
                self._lru.remove(key)
            return None
        if layers is None or layers.start == 0:  # once per layer-by-layer stream
            try:
                os.utime(path)
            except OSError:
                pass
        return found

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        data = payload.data
        if len(data) > self.capacity:
            return
        atomic_write(self.path(key), data)
        with self._lock:
            self._lru.add(key, len(data))
            victims = self._lru.evict(keep=key, pinned=pinned)
            # Under the lock, so a write of the same key can't land between the read and the unlink.
            for victim in victims:
                vpath = self.path(victim)
                try:
                    if on_evict is not None:
                        on_evict(Payload(victim, data=vpath.read_bytes()))
                    vpath.unlink()
                except FileNotFoundError:
                    pass
        self.counters.add(bytes_written=len(data), evictions=len(victims))

    def remove(self, key: str) -> bool:
        with self._lock:
            known = self._lru.remove(key)
            try:
                self.path(key).unlink()
                return True
            except FileNotFoundError:
                return known

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return self._lru.used, len(self._lru)
