"""TieredStore: chunk KV across an ordered list of tiers, fastest first.

The usual order is device, cpu, disk, redis, s3 (any may be absent), but the store knows no
kinds: it reads each tier's traits (tier_base.Tier) and applies one set of rules.

- put: the chunk is encoded and written into the top tier on the caller's thread (when that
  tier is fast), so an immediate `get` sees it. The other tiers that get a copy
  (policy.copy_targets: the disk in write-through mode, shared tiers) are written on the
  background writer. A write still on its way is served as if it had landed.
- get: tiers are tried in order. A hit below the top is promoted to the tiers above it
  (policy.copy_targets; memory at once, slow tiers in the background). A layer-range
  read from a lazy tier (disk) reads only those layers, and the whole chunk is promoted in
  the background once a read reaches the chunk's last layer (a layer-by-layer stream ended).
- eviction: an entry evicted from a tier moves to the next tier down unless it is already
  there (so in write-back mode the disk gets chunks as the cpu tier evicts them, and on
  flush/close). Until that move finishes the entry is still served.
- failures: a write that fails is logged and counted in its tier's `errors`, never raised;
  the disk tier writes atomically, so a failed write leaves no file behind.
- pins: `get` pins its key for the duration of the read, and `pin`/`unpin` let a caller hold
  keys across many reads (LayerPrefetcher does); pinned keys are never evicted.
- get_or_compute: on a miss everywhere one caller computes and the rest of the same key wait
  for it (single-flight).

Thread-safe. Lock order: a tier may take the store's pin lock and the transit lock under its
own (through `pinned` and `on_evict`), never the reverse.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch

from kvstore.base import ChunkKV
from kvstore.flight import SingleFlight
from kvstore.keys import check_key
from kvstore.policy import copy_targets, write_back_targets
from kvstore.quant import STORAGE_DTYPES, StoredChunk, decode, encode
from kvstore.serialize import CorruptBlob
from kvstore.tier_base import Payload, Tier
from kvstore.transit import Transit, Write
from kvstore.workers import Workers

log = logging.getLogger(__name__)


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

        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        self._flights: SingleFlight[ChunkKV] = SingleFlight()
        self._transit = Transit()
        # Writes to slow tiers run in order on one thread; whole-chunk loads after a stream on two.
        self._writer = Workers(1, "kvstore-write")
        self._loader = Workers(2, "kvstore-load")
        self._closed = False

    # --- public interface -------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether any tier holds `key`, or a write of it is on its way (asks shared tiers last)."""
        check_key(key)
        return any(self._transit.find(i, key) is not None or t.contains(key) for i, t in enumerate(self.tiers))

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
            hit = self._lookup(key, layers)
        finally:
            self.unpin([key])
        if hit is None:
            return None
        chunk, tier = hit
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

        def get_or_put() -> ChunkKV:
            found = self.get(key)  # a previous leader may have finished since our first look
            if found is not None:
                return found
            computed = compute()
            self.put(key, computed)
            return ChunkKV(computed.keys, computed.values, 0, "computed", computed.sensitivity)

        kv, leader = self._flights.run(key, get_or_put)
        if leader:
            return kv
        return ChunkKV(kv.keys.clone(), kv.values.clone(), kv.first_layer, kv.tier,
                       None if kv.sensitivity is None else kv.sensitivity.clone())

    def put(self, key: str, kv: ChunkKV) -> None:
        """Store the whole chunk `kv` (first_layer 0) under `key` in `storage_dtype`.

        Returns once the chunk is readable; writes to slow tiers finish in the background.
        """
        check_key(key)
        self._check_open()
        payload = Payload(key, encode(kv, self.storage_dtype))
        for i in copy_targets(self.tiers, len(self.tiers), self.write_through, put=True):
            self._send(i, payload)

    def delete(self, key: str) -> bool:
        """Remove `key` from every tier and cancel its pending writes; True if any had it."""
        check_key(key)
        found = self._transit.cancel(key)
        for tier in self.tiers:
            found |= tier.remove(key)
        return found

    def pin(self, keys: Iterable[str]) -> None:
        """Keep `keys` from being evicted until as many `unpin` calls."""
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
        """Wait for background work; in write-back mode first write volatile tiers' chunks to disk."""
        self._loader.drain()
        targets = [] if self.write_through else write_back_targets(self.tiers)
        for tier in self.tiers if targets else ():
            if tier.volatile:
                for key, chunk in tier.items():
                    payload = Payload(key, chunk)
                    for i in targets:
                        self._send(i, payload, if_absent=True)
        self._writer.drain()

    def stats(self) -> dict[str, dict[str, float]]:
        """Counters per tier name; see the kvstore package docstring."""
        return {t.name: t.stats() for t in self.tiers}

    def close(self) -> None:
        """Flush, stop background threads and close connections. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._loader.shutdown()
        self._writer.shutdown()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------

    def _lookup(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, str]]:
        """(chunk, tier name) of the first tier holding `key` (pinned by the caller); promotes it."""
        for i, tier in enumerate(self.tiers):
            # A chunk evicted from tier i-1 is in transit to tier i before it leaves i-1, and
            # stays in transit until it lands here: checking in this order can't miss it.
            chunk = self._read_transit(i, key)
            if chunk is None:
                chunk = tier.read(key, layers)
            if chunk is not None:
                break
        else:
            return None
        if chunk.is_whole:
            payload = Payload(key, chunk)
            for above in copy_targets(self.tiers, i, self.write_through, put=False):
                self._send(above, payload)
        elif layers is not None and layers.stop == chunk.total_layers:
            self._loader.submit(self._load, key)  # a layer stream ended: bring it all up
        return chunk, tier.name

    def _load(self, key: str) -> None:
        self.pin([key])
        try:
            self._lookup(key, None)
        finally:
            self.unpin([key])

    def _read_transit(self, i: int, key: str) -> Optional[StoredChunk]:
        w = self._transit.find(i, key)
        if w is None:
            return None
        try:
            chunk = w.payload.chunk
        except CorruptBlob:  # a damaged file on its way down: the tier below will drop it
            return None
        self.tiers[i].counters.add(hits=1)
        return chunk

    # --- writing ----------------------------------------------------------------------

    def _send(self, i: int, payload: Payload, if_absent: bool = False) -> None:
        """Write `payload` into tier i (on the writer if the tier is slow); readable at once."""
        self._dispatch(self._transit.add(i, payload, if_absent))

    def _dispatch(self, w: Write) -> None:
        if self.tiers[w.tier].slow_write:
            self._writer.submit(self._land, w)
        else:
            self._land(w)

    def _land(self, w: Write) -> None:
        """Do write `w`, then send what it evicted one tier down."""
        tier, key = self.tiers[w.tier], w.payload.key
        evicted: list[Write] = []

        def on_evict(payload: Payload) -> None:  # called under the tier's lock
            evicted.append(self._transit.add(w.tier + 1, payload, if_absent=True))

        wrote = False
        try:
            if self._transit.start(w) and not (w.if_absent and tier.contains(key)):
                tier.write(key, w.payload, self._pinned, on_evict if w.tier + 1 < len(self.tiers) else None)
                wrote = True
        except Exception:
            # A cache that could not store a chunk just misses it later: never the caller's error.
            log.exception("kvstore: writing chunk %s to the %s tier failed", key, tier.name)
            tier.counters.add(errors=1)
        finally:
            if self._transit.done(w) and wrote:
                tier.remove(key)  # delete() ran while we wrote: don't bring it back
        for e in evicted:
            self._dispatch(e)

    # --- helpers ----------------------------------------------------------------------

    def _pinned(self, key: str) -> bool:
        with self._lock:
            return self._pins[key] > 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
