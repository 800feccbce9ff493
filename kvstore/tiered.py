"""TieredStore: chunk KV across memory, disk and shared tiers.

Tiers are kept in a fixed order, fastest first: device, cpu, disk, redis, s3 (any may be
absent). Rules:

- put: the first memory tier gets the chunk; the disk tier too in write-through mode (or
  when there is no memory tier); every shared tier (Redis, S3) gets it in the background.
- get: tiers are tried in order. A hit below the top is promoted to the tiers above it
  (memory tiers at once; disk, in write-through mode, and shared tiers in the background).
  A layer-range read from disk is served lazily, and the whole chunk is promoted in the
  background once a read reaches the chunk's last layer (a layer-by-layer stream ended).
- eviction: an entry evicted from a tier moves to the next tier down unless it is already
  there (so in write-back mode the disk gets chunks as the cpu tier evicts them, and on
  flush/close). Until that move finishes the entry is still served from memory.
- pins: `get` pins its key for the duration of the read, and `pin`/`unpin` let a caller hold
  keys across many reads (LayerPrefetcher does); pinned keys are never evicted from local tiers.
- get_or_compute: on a miss everywhere one caller computes and the rest of the same key wait
  for it (single-flight).

Thread-safe. Memory tiers are touched only under `_lock`; disk and shared tiers lock
themselves. Lock order: a tier's own lock may be held while taking `_lock`, never the reverse.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch

from kvstore import serialize
from kvstore.base import ChunkKV
from kvstore.keys import check_key
from kvstore.quant import STORAGE_DTYPES, StoredChunk, decode, encode
from kvstore.tier_base import Payload, SharedTier, Tier
from kvstore.tier_disk import DiskTier
from kvstore.tier_memory import MemoryTier

log = logging.getLogger(__name__)

# A chunk read from a tier, with the tier's position and name.
_Hit = tuple[StoredChunk, int, str]


class _Flight:
    """One in-progress computation of a key that other callers wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Optional[ChunkKV] = None
        self.error: Optional[BaseException] = None


class TieredStore:
    """A ChunkStore over an ordered list of tiers (see the module docstring for the rules).

    `get` returns tensors on `device` in the dtype `put` was given; they never share memory
    with the stored copy. `storage_dtype` is how chunks are kept in every tier.
    """

    def __init__(self, tiers: Sequence[Tier], storage_dtype: str = "float16",
                 device: Union[torch.device, str] = "cpu",
                 disk_write: Literal["through", "back"] = "through") -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {storage_dtype!r}")
        if disk_write not in ("through", "back"):
            raise ValueError(f"disk_write must be 'through' or 'back', not {disk_write!r}")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        self.tiers: list[Tier] = list(tiers)
        self.storage_dtype = storage_dtype
        self.device = torch.device(device)
        self.write_through = disk_write == "through"
        self._memory = [i for i, t in enumerate(self.tiers) if isinstance(t, MemoryTier)]
        self._disk = next((i for i, t in enumerate(self.tiers) if isinstance(t, DiskTier)), None)
        self._shared = [i for i, t in enumerate(self.tiers) if t.shared]
        self._cpu = next((i for i, t in enumerate(self.tiers) if t.name == "cpu"), None)
        if self._disk is not None:
            disk = self.tiers[self._disk]
            assert isinstance(disk, DiskTier)
            disk.keep_evicted = self._disk + 1 < len(self.tiers)

        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        self._flights: dict[str, _Flight] = {}
        # Entries evicted from a memory tier while their move down is under way: key -> (tier, chunk).
        self._moving: dict[str, tuple[int, StoredChunk]] = {}
        # Writes to disk and shared tiers run in order on one thread; reads for prefetch and
        # promotion on two.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-write")
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="kvstore-load")
        self._pending: dict[ThreadPoolExecutor, set[Future]] = {self._writer: set(), self._loader: set()}
        self._closed = False

    # --- public interface -------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether any tier holds `key` (asks shared tiers last)."""
        check_key(key)
        with self._lock:
            if key in self._moving or any(self.tiers[i].contains(key) for i in self._memory):
                return True
        return any(t.contains(key) for i, t in enumerate(self.tiers) if i not in self._memory)

    def get(self, key: str, layers: Optional[range] = None) -> Optional[ChunkKV]:
        """KV of `key`, all layers or `layers` (absolute indices), or None on a miss.

        Raises ValueError for a malformed key or range, IndexError for a range past the chunk.
        """
        check_key(key)
        if layers is not None and (not isinstance(layers, range) or layers.step != 1
                                   or not 0 <= layers.start < layers.stop):
            raise ValueError(f"layers must be a non-empty range with step 1, not {layers!r}")
        self._check_open()
        self.pin([key])
        try:
            hit = self._lookup(key, layers, promote_to=0)
        finally:
            self.unpin([key])
        if hit is None:
            return None
        chunk, _, tier = hit
        if layers is not None:
            chunk = chunk.layers(layers)
        return decode(chunk, self.device, tier)

    def get_or_compute(self, key: str, compute: Callable[[], ChunkKV]) -> ChunkKV:
        """`get(key)`, or on a miss `compute()` once across concurrent callers, stored via `put`.

        The computed KV comes back as given with tier "computed" (waiting callers get copies).
        If `compute` raises, every caller waiting on it gets that exception.
        """
        kv = self.get(key)
        if kv is not None:
            return kv
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            r = flight.result
            return ChunkKV(r.keys.clone(), r.values.clone(), r.first_layer, r.tier,
                           None if r.sensitivity is None else r.sensitivity.clone())
        try:
            kv = self.get(key)  # a previous leader may have finished since our first look
            if kv is None:
                computed = compute()
                self.put(key, computed)
                kv = ChunkKV(computed.keys, computed.values, 0, "computed", computed.sensitivity)
            flight.result = kv
            return kv
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def put(self, key: str, kv: ChunkKV) -> None:
        """Store the whole chunk `kv` (first_layer 0) under `key` in `storage_dtype`."""
        check_key(key)
        self._check_open()
        chunk = encode(kv, self.storage_dtype)
        if self._memory:
            self._insert(self._memory[0], key, chunk)
        if self._disk is not None and (self.write_through or not self._memory):
            self._insert(self._disk, key, chunk)
        if self._shared:
            self._background(self._writer, self._write_shared, self._shared, key, chunk, False)

    def delete(self, key: str) -> bool:
        """Remove `key` from every tier; True if any tier had it."""
        check_key(key)
        self._drain(self._writer)  # a queued write must not bring it back
        found = False
        with self._lock:
            found |= self._moving.pop(key, None) is not None
            for i in self._memory:
                found |= self.tiers[i].remove(key)
        for i, tier in enumerate(self.tiers):
            if i not in self._memory:
                found |= tier.remove(key)
        return found

    def prefetch(self, keys: Iterable[str]) -> Future:
        """Load `keys` into the cpu tier in the background; the future resolves when done."""
        keys = [check_key(k) for k in keys]
        self._check_open()
        if self._cpu is None:
            done: Future = Future()
            done.set_result(None)
            return done
        return self._background(self._loader, self._prefetch, keys)

    def pin(self, keys: Iterable[str]) -> None:
        """Keep `keys` from being evicted from local tiers until as many `unpin` calls."""
        with self._lock:
            self._pins.update(keys)

    def unpin(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self._lock:
            self._pins.subtract(keys)
            for k in set(keys):
                if self._pins[k] <= 0:
                    del self._pins[k]

    def flush(self) -> None:
        """Finish background work; in write-back mode also write memory-only chunks to disk."""
        self._drain(self._loader)
        if self._disk is not None and not self.write_through:
            with self._lock:
                entries = {k: c for t in self.tiers if isinstance(t, MemoryTier) for k, c in t.items()}
                entries.update({k: c for k, (_, c) in self._moving.items()})
            for key, chunk in entries.items():
                if not self._tier_contains(self._disk, key):
                    self._insert(self._disk, key, chunk)
        self._drain(self._loader)
        self._drain(self._writer)

    def stats(self) -> dict[str, dict[str, float]]:
        """Counters per tier name; see the kvstore package docstring."""
        with self._lock:
            out = {self.tiers[i].name: self.tiers[i].stats() for i in self._memory}
        out.update({t.name: t.stats() for i, t in enumerate(self.tiers) if i not in self._memory})
        return {t.name: out[t.name] for t in self.tiers}

    def close(self) -> None:
        """Flush, stop background threads and close connections. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._loader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------

    def _lookup(self, key: str, layers: Optional[range], promote_to: int) -> Optional[_Hit]:
        """First tier holding `key` (the caller has pinned it); promotes into tiers >= promote_to."""
        hit: Optional[_Hit] = None
        with self._lock:
            moving = self._moving.get(key)
            for i in self._memory:
                tier = self.tiers[i]
                if moving is not None and moving[0] == i:
                    tier.counters.add(hits=1)  # evicted, on its way down: still served from here
                    chunk: Optional[StoredChunk] = moving[1]
                else:
                    chunk = tier.read(key, layers)
                if chunk is not None:
                    hit = (chunk, i, tier.name)
                    break
        if hit is None:
            for i, tier in enumerate(self.tiers):
                if i in self._memory:
                    continue
                chunk = tier.read(key, layers)
                if chunk is not None:
                    hit = (chunk, i, tier.name)
                    break
        if hit is None:
            return None
        chunk, i, _ = hit
        if i > promote_to:
            if chunk.is_whole:
                self._promote(key, chunk, i, promote_to)
            elif i == self._disk and layers is not None and layers.stop == chunk.total_layers:
                self._background(self._loader, self._load, key, promote_to)
        return hit

    def _load(self, key: str, promote_to: int) -> None:
        self.pin([key])
        try:
            self._lookup(key, None, promote_to)
        finally:
            self.unpin([key])

    def _prefetch(self, keys: list[str]) -> None:
        assert self._cpu is not None
        for key in keys:
            self._load(key, self._cpu)

    def _promote(self, key: str, chunk: StoredChunk, found_at: int, promote_to: int) -> None:
        for i in range(promote_to, found_at):
            if i in self._memory:
                self._insert(i, key, chunk)
            elif i == self._disk and self.write_through:
                self._background(self._writer, self._insert, i, key, chunk)
            elif i in self._shared:
                self._background(self._writer, self._write_shared, [i], key, chunk, False)

    # --- writing ----------------------------------------------------------------------

    def _insert(self, i: int, key: str, chunk: StoredChunk) -> None:
        """Write `chunk` into local tier i and move what it evicts one tier down."""
        tier = self.tiers[i]
        if isinstance(tier, MemoryTier):
            chunk = tier.prepare(chunk)  # the device copy, outside the lock
            with self._lock:
                evicted = tier.write(key, chunk, self._pinned_locked)
                for k, payload in evicted:
                    assert isinstance(payload, StoredChunk)
                    self._moving[k] = (i, payload)
        else:
            evicted = tier.write(key, chunk, self._pinned)
        for k, payload in evicted:
            self._demote(i, k, payload)

    def _demote(self, i: int, key: str, payload: Payload) -> None:
        below = i + 1
        inserted = False
        try:
            if below >= len(self.tiers):
                return
            if self.tiers[below].shared:
                self._background(self._writer, self._write_shared, [below], key, payload, True)
            elif not self._tier_contains(below, key):
                # Only the disk tier yields bytes, and only shared tiers lie below it.
                assert isinstance(payload, StoredChunk)
                self._insert(below, key, payload)
                inserted = True
        finally:
            with self._lock:
                moving = self._moving.get(key)
                deleted = isinstance(payload, StoredChunk) and moving is None
                if moving is not None and moving[1] is payload:
                    del self._moving[key]
            if deleted and inserted:  # delete() ran while we moved it: don't resurrect it
                self.tiers[below].remove(key)

    def _write_shared(self, tiers: list[int], key: str, payload: Payload, if_absent: bool) -> None:
        data = payload if isinstance(payload, bytes) else serialize.to_bytes(key, payload)
        for i in tiers:
            tier = self.tiers[i]
            assert isinstance(tier, SharedTier)
            if not (if_absent and tier.contains(key)):
                tier.write_bytes(key, data)

    # --- helpers ----------------------------------------------------------------------

    def _tier_contains(self, i: int, key: str) -> bool:
        if i in self._memory:
            with self._lock:
                return self.tiers[i].contains(key)
        return self.tiers[i].contains(key)

    def _pinned_locked(self, key: str) -> bool:
        return self._pins[key] > 0

    def _pinned(self, key: str) -> bool:
        with self._lock:
            return self._pinned_locked(key)

    def _background(self, pool: ThreadPoolExecutor, fn: Callable[..., None], *args: object) -> Future:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("kvstore background task %s failed", getattr(fn, "__name__", fn))

        future = pool.submit(run)
        pending = self._pending[pool]
        with self._lock:
            pending.add(future)
        future.add_done_callback(lambda f: self._forget_future(pending, f))
        return future

    def _forget_future(self, pending: set[Future], future: Future) -> None:
        with self._lock:
            pending.discard(future)

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        """Wait until `pool` has no pending tasks (including ones queued while waiting)."""
        while True:
            with self._lock:
                pending = list(self._pending[pool])
            if not pending:
                return
            wait(pending)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
