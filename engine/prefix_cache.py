"""Exact reuse of leading segments, as vLLM's prefix caching would do at segment granularity.

An entry holds the post-RoPE KV of a prompt's first P tokens. It is registered under the
chained hash of every leading run of whole segments it covers, so a later prompt that shares
only the first j segments still finds (the first part of) it. LRU by bytes. The chain starts
from a salt (a tenant's, or a request's `cache_salt`): prompts under different salts never
share an entry, so a fast first token tells nobody what another salt's prompts held.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch

from engine.segments import Segment
from kvstore.lru import LRU


@dataclass
class PrefixEntry:
    k: torch.Tensor  # [L, Hkv, P, D] post-RoPE
    v: torch.Tensor  # [L, Hkv, P, D]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def boundary_hashes(segments: list[Segment], salt: str = "") -> list[tuple[str, int]]:
    """(chained hash, token count) after each leading segment, the chain seeded with `salt`."""
    h = hashlib.sha256()
    if salt:  # unsalted chains stay as they were
        h.update(b"salt\0" + len(salt).to_bytes(8, "little") + salt.encode())
    out, n = [], 0
    for seg in segments:
        h.update(len(seg).to_bytes(8, "little"))
        h.update(torch.tensor(seg.token_ids, dtype=torch.int64).numpy().tobytes())
        n += len(seg)
        out.append((h.hexdigest(), n))
    return out


class PrefixCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._entries: dict[int, PrefixEntry] = {}    # id -> entry
        self._lru: LRU[int] = LRU(capacity_bytes)     # entry ids by recent use
        self._index: dict[str, tuple[int, int]] = {}  # boundary hash -> (entry id, length)
        self._next_id = 0
        self._lock = threading.Lock()
        self.queries = 0
        self.hits = 0

    def lookup(self, segments: list[Segment], max_len: int, salt: str = "") -> tuple[int, PrefixEntry | None]:
        """Longest cached leading run of whole segments no longer than max_len tokens, under `salt`."""
        with self._lock:
            self.queries += 1
            for digest, n in reversed(boundary_hashes(segments, salt)):
                hit = self._index.get(digest)
                if n <= max_len and hit is not None and hit[0] in self._entries:
                    self._lru.touch(hit[0])
                    self.hits += 1
                    return n, self._entries[hit[0]]
            return 0, None

    def insert(self, segments: list[Segment], num_segments: int, k: torch.Tensor, v: torch.Tensor,
               salt: str = "") -> None:
        """Register the KV of the first num_segments segments under `salt`; k, v: [L, Hkv, >=P, D]."""
        if num_segments == 0:
            return
        bounds = boundary_hashes(segments, salt)[:num_segments]
        P = bounds[-1][1]
        if P == 0:
            return
        with self._lock:
            if bounds[-1][0] in self._index and self._index[bounds[-1][0]][0] in self._entries:
                return
            entry = PrefixEntry(k[:, :, :P].clone(), v[:, :, :P].clone())
            if entry.nbytes > self.capacity:
                return
            eid, self._next_id = self._next_id, self._next_id + 1
            self._entries[eid] = entry
            self._lru.add(eid, entry.nbytes)
            for old in self._lru.evict(keep=eid):
                del self._entries[old]
            for digest, n in bounds:
                self._index[digest] = (eid, n)
            if len(self._index) > 8 * len(self._entries) + 64:
                self._index = {d: hit for d, hit in self._index.items() if hit[0] in self._entries}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._lru = LRU(self.capacity)
