"""Layer-by-layer loading of chunk KV, overlapped with the engine's per-layer compute.

A background thread reads layer 0 of every key, then layer 1, and so on; the engine asks for
layer l when it reaches it and blocks only if that layer is not loaded yet. Timings show
whether loading was hidden: `load_seconds[l]` is the wall time the fetch of layer l took and
`wait_seconds[l]` how long the consumer blocked for it.

On CUDA the reads run on a side stream, so host-to-device copies overlap the engine's kernels
instead of queueing behind them; a layer is handed over once its copies have finished. Every
prefetcher on a device shares one side stream: the CUDA caching allocator keeps freed blocks per
stream, so a new stream per prefill would find none to reuse and call cudaMalloc for every
tensor (2,049 calls, 320 ms of host time per 32k-token prefill on an H200).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
import time
from typing import Optional, Sequence

import torch

from kvstore.base import ChunkStore

log = logging.getLogger(__name__)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per key: (k [Hkv, T, D], v [Hkv, T, D])
# The consumer waits at most this long for one layer; then the chunk being read counts as missing
# (the engine recomputes it) instead of a request hanging on a stuck tier.
LAYER_WAIT_S = 60.0
# Layers loaded ahead of the deepest one asked for. Bounded, so a prefill paused between decode
# steps does not have its whole chunk KV decoded at once beside them (on 2 cores that made the
# first decode step after a prefill started take 0.13-0.26 s, not 0.05 s), and its memory stays
# a few layers.
LOOKAHEAD = 2


def one_thread_here() -> None:
    """Run this thread's torch ops on this thread alone: a team of its own would take the cores
    from the engine's. Not `torch.set_num_threads(1)`: that also sets torch's process-wide count,
    which a C++ extension's first parallel call on the engine's thread then adopts (its own lazy
    OpenMP init), and from then on the engine's prefills and decodes ran on one core of two."""
    torch.get_num_threads()  # torch's lazy OpenMP init for this thread, which would undo the next line
    set_threads = _omp_set_num_threads()
    if set_threads is not None:  # else no GNU OpenMP (another platform's torch): the loader shares the team
        set_threads(1)  # this thread's ICV only


@functools.cache
def _omp_set_num_threads():
    """libgomp's omp_set_num_threads, looked up once (torch's copy: the same soname), or None."""
    try:
        return ctypes.CDLL("libgomp.so.1").omp_set_num_threads
    except (OSError, AttributeError):
        return None


@functools.cache
def side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


class ChunkMissing(Exception):
    """A chunk was missing or corrupt when its layers were read; the engine should compute it."""

    def __init__(self, key: str) -> None:
        super().__init__(f"chunk {key} is missing or corrupt")
        self.key = key


class LayerPrefetcher:
    """Streams layers 0..num_layers-1 of `keys` from `store` in a background thread.

    Keys are pinned in the store (if it supports pinning) until `close()`, so eviction can't
    take a chunk away mid-stream. Use as a context manager or call `close()`.
    """

    def __init__(self, store: ChunkStore, keys: Sequence[str], num_layers: int, layers_per_fetch: int = 1) -> None:
        if num_layers < 1 or layers_per_fetch < 1:
            raise ValueError("num_layers and layers_per_fetch must be at least 1")
        self.keys = list(keys)
        self.num_layers = num_layers
        self.layers_per_fetch = layers_per_fetch
        self.load_seconds = [0.0] * num_layers
        self.wait_seconds = [0.0] * num_layers
        self.tiers: dict[str, str] = {}  # key -> tier its first layer came from
        self._sensitivity: list[Optional[torch.Tensor]] = []  # per key, from the first fetch
        self._store = store
        self._layers: list[Optional[LayerKV]] = [None] * num_layers
        self._error: Optional[ChunkMissing] = None
        self._error_layer = num_layers  # layers from here on will not arrive
        self._cond = threading.Condition()
        self._reading = (self.keys[0] if self.keys else "", 0)  # (key, first layer) being read now
        self._stop = False
        self._asked = 0  # the deepest layer the consumer asked for
        self._closed = False
        self._pin = getattr(store, "pin", None)
        self._unpin = getattr(store, "unpin", None)
        device = getattr(store, "device", None)
        self._stream = side_stream(device) if isinstance(device, torch.device) and device.type == "cuda" else None
        if self._pin is not None:
            self._pin(self.keys)
        self._thread = threading.Thread(target=self._run, name="kvstore-layers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stream is None:
            one_thread_here()
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                self._stream_layers()
        except Exception:  # never leave the consumer waiting for layers that will not come
            log.exception("loading chunk %s from layer %d failed", *self._reading)
            self._fail(*self._reading)

    def _stream_layers(self) -> None:
        for start in range(0, self.num_layers, self.layers_per_fetch):
            stop = min(start + self.layers_per_fetch, self.num_layers)
            with self._cond:
                while start > self._asked + LOOKAHEAD and not self._stop:
                    self._cond.wait()
            t0 = time.perf_counter()
            got = []
            for key in self.keys:
                if self._stop:
                    return
                self._reading = (key, start)
                try:
                    kv = self._store.get(key, range(start, stop))
                except Exception:
                    log.exception("reading layers %d-%d of chunk %s failed", start, stop - 1, key)
                    kv = None
                if kv is None:
                    self._fail(key, start)
                    return
                self.tiers.setdefault(key, kv.tier)
                got.append(kv)
            if self._stream is not None:
                self._stream.synchronize()  # copies done: the time is real and the consumer needn't wait
            per_layer = (time.perf_counter() - t0) / (stop - start)
            with self._cond:
                if start == 0:
                    self._sensitivity = [kv.sensitivity for kv in got]
                for l in range(start, stop):
                    # kv.keys: [stop - start, Hkv, T, D]
                    self._layers[l] = [(kv.keys[l - start], kv.values[l - start]) for kv in got]
                    self.load_seconds[l] = per_layer
                self._cond.notify_all()

    def _fail(self, key: str, layer: int) -> None:
        with self._cond:
            self._error = ChunkMissing(key)
            self._error_layer = layer
            self._cond.notify_all()

    def sensitivity(self) -> list[Optional[torch.Tensor]]:
        """Per key, its token sensitivity [T] (None where the chunk has none); blocks until layer 0 is loaded."""
        self.layer(0)
        return self._sensitivity

    def layer(self, l: int) -> LayerKV:
        """(k, v) of layer `l` for every key, in key order; blocks until loaded.

        Raises ChunkMissing if a key could not be read at or before this layer.
        """
        if not 0 <= l < self.num_layers:
            raise IndexError(f"layer {l} outside 0..{self.num_layers - 1}")
        t0 = time.perf_counter()
        with self._cond:
            if l > self._asked:
                self._asked = l
                self._cond.notify_all()
            while self._layers[l] is None and l < self._error_layer and not self._stop:
                if not self._cond.wait(timeout=max(0.0, t0 + LAYER_WAIT_S - time.perf_counter())):
                    key, _ = self._reading
                    log.warning("chunk %s: layer %d not loaded after %.0f s; recomputing it", key, l, LAYER_WAIT_S)
                    self._error, self._error_layer, self._stop = ChunkMissing(key), l, True
            self.wait_seconds[l] += time.perf_counter() - t0
            result = self._layers[l]
            if result is None:
                if self._error is not None and l >= self._error_layer:
                    raise self._error
                raise RuntimeError("LayerPrefetcher is closed")
        if self._stream is not None:
            # Made on the side stream, used on the consumer's: keep the allocator from reusing
            # their memory before the consumer's kernels are done with it.
            consumer = torch.cuda.current_stream()
            for k, v in result:
                k.record_stream(consumer)
                v.record_stream(consumer)
        return result

    @property
    def total_load_seconds(self) -> float:
        return sum(self.load_seconds)

    @property
    def total_wait_seconds(self) -> float:
        return sum(self.wait_seconds)

    def close(self) -> None:
        """Stop the thread (after its current read) and unpin the keys. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=LAYER_WAIT_S)  # a read stuck past that stays behind (a daemon thread)
        if self._unpin is not None:
            self._unpin(self.keys)

    def __enter__(self) -> "LayerPrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
