"""Disk tier: one safetensors file per chunk under a folder, evicted by bytes.

Files live at `<root>/<key[:2]>/<key>.safetensors`; the name comes only from a validated key.
Writes are atomic (see atomic.py). On start the index is rebuilt from the folder: temp files
of interrupted writes are deleted, sizes read, and LRU order taken from mtimes (a read
touches the file's mtime, so the order survives restarts). Blobs are checked when read, not
at start. One process owns a folder.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from kvstore import serialize
from kvstore.atomic import atomic_write, remove_temp_files
from kvstore.keys import KEY_RE, check_key
from kvstore.lru import EvictionPolicy, LRUPolicy
from kvstore.quant import StoredChunk
from kvstore.tier_base import Payload, Pinned, Tier

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class DiskTier(Tier):
    name = "disk"

    def __init__(self, root: Path, capacity: int, policy: Optional[EvictionPolicy] = None) -> None:
        super().__init__(capacity)
        self.root = Path(root)
        # Set by TieredStore when a tier below exists: evicted files are then read before deletion
        # and handed back for demotion.
        self.keep_evicted = False
        self._policy = policy or LRUPolicy()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(self.root)
        if removed:
            log.info("disk tier: removed %d temp files of interrupted writes", removed)
        self._scan()

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []  # (mtime_ns, key, size)
        for path in self.root.glob(f"*/*{SUFFIX}"):
            key = path.name[: -len(SUFFIX)]
            if not KEY_RE.match(key) or path.parent.name != key[:2]:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self._bytes += size
            self._policy.add(key)
        # A smaller capacity than last run: drop the oldest files.
        for key, _ in self._pick_victims(None, lambda _: False):
            self._forget(key)
            self.path(key).unlink(missing_ok=True)

    def _pick_victims(self, keep: Optional[str], pinned: Pinned) -> list[tuple[str, int]]:
        victims: list[tuple[str, int]] = []
        excess = self._bytes - self.capacity
        for victim in self._policy.victims():
            if excess <= 0:
                break
            if victim != keep and not pinned(victim):
                victims.append((victim, self._sizes[victim]))
                excess -= self._sizes[victim]
        return victims

    def _forget(self, key: str) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._bytes -= size
        self._policy.remove(key)
        return True

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        with self._lock:
            if key not in self._sizes:
                return None
            self._policy.touch(key)
        path = self.path(key)
        try:
            found = serialize.read_file(key, path, layers)
        except FileNotFoundError:  # removed behind our back
            with self._lock:
                self._forget(key)
            return None
        if layers is None or layers.start == 0:  # once per layer-by-layer stream
            try:
                os.utime(path)
            except OSError:
                pass
        return found

    def write(self, key: str, chunk: StoredChunk, pinned: Pinned) -> list[tuple[str, Payload]]:
        return self.write_bytes(key, serialize.to_bytes(key, chunk), pinned)

    def write_bytes(self, key: str, data: bytes, pinned: Pinned) -> list[tuple[str, Payload]]:
        """Store a serialized chunk; returns evicted entries as (key, file bytes) if `keep_evicted`."""
        if len(data) > self.capacity:
            return []
        path = self.path(key)
        try:
            atomic_write(path, data)
        except OSError as e:
            log.warning("disk tier: writing %s failed: %s", path, e)
            self.counters.add(errors=1)
            return []
        with self._lock:
            self._forget(key)
            self._sizes[key] = len(data)
            self._bytes += len(data)
            self._policy.add(key)
            victims = self._pick_victims(key, pinned)
            for victim, _ in victims:
                self._forget(victim)
        self.counters.add(bytes_written=len(data), evictions=len(victims))
        evicted: list[tuple[str, Payload]] = []
        for victim, _ in victims:
            vpath = self.path(victim)
            try:
                if self.keep_evicted:
                    evicted.append((victim, vpath.read_bytes()))
                vpath.unlink()
            except FileNotFoundError:
                pass
        return evicted

    def remove(self, key: str) -> bool:
        with self._lock:
            known = self._forget(key)
            path = self.path(key)
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return known

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return self._bytes, len(self._sizes)
