"""The prefill of one resolved prompt: prefix-cache lookup, chunk KV fetch, the blend layer loop.

segments -> which tokens are exact / chunk / forced -> chunk KV (stored: streamed layer by
layer under the compute; missed: computed now, used from memory, stored in the background)
-> `blend_prefill_steps` -> fused cache and last-token logits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Generator, Optional, Sequence

import torch

from engine.blend import KVCache, PrefillInput, PrefillResult, blend_prefill_steps
from engine.chunks import Precompute, key_for, precompute_chunk
from engine.model import Transformer
from engine.prefix_cache import PrefixCache
from engine.request import BlendSpec
from engine.resolve import BLEND_MODES
from engine.segments import Segment, spans, token_ids, tokenize
from kvstore import ChunkMissing, LayerPrefetcher
from kvstore.base import ChunkKV, ChunkStore
from kvstore.keys import chunk_key

log = logging.getLogger(__name__)

TURN_CONVENTION = "turn-v1"


@dataclass
class Prefilled:
    """A prefill's result plus where its chunk KV came from."""
    result: PrefillResult
    chunk_tiers: dict[str, int]  # tier -> chunks (and turns) read from it (misses are not counted here)
    chunk_misses: int            # chunks computed during this prefill
    chunk_compute_s: float       # spent computing them
    kv_load_s: float             # the loader busy (overlapped with the compute)
    turn_tokens: int = 0         # tokens whose KV came from stored turns
    computed_turns: list[int] = field(default_factory=list)  # turn segments computed in full (keep them)
    exact_segments: int = 0      # leading segments whose KV is exact (the prefix cache may keep them)

    @property
    def kv_wait_s(self) -> float:
        return self.result.stats.kv_wait_s

    @property
    def kv_fetch_s(self) -> float:
        """TTFT spent getting chunk KV: computing misses plus waiting on loads."""
        return self.chunk_compute_s + self.kv_wait_s


class Prefiller:
    def __init__(self, model: Transformer, tokenizer, store: ChunkStore, precompute: Precompute,
                 prefix_cache: PrefixCache, recompute_chunk_head: int = 0, reuse_turns: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.precompute = precompute
        self.prefix_cache = prefix_cache
        self.recompute_chunk_head = recompute_chunk_head
        self.reuse_turns = reuse_turns
        self.kv_dtype = str(model.dtype).removeprefix("torch.")

    # --- chunks -----------------------------------------------------------------------------

    def chunk_segment(self, ids: Sequence[int], salt: str = "") -> Segment:
        ids = tuple(ids)
        return Segment("chunk", ids, key_for(self.model, self.precompute, ids, self.kv_dtype, salt), salt)

    def turn_key(self, ids: tuple[int, ...], salt: str = "") -> str:
        """A turn's content key: its own convention (its KV is cut from a request, not precomputed)."""
        return chunk_key(ids, self.model.fingerprint, self.kv_dtype, TURN_CONVENTION, salt)

    def chunk_from_text(self, text: str, salt: str = "") -> Segment:
        return self.chunk_segment(tokenize(self.tokenizer, text), salt)

    def compute_chunk_kv(self, segment: Segment) -> ChunkKV:
        return precompute_chunk(self.model, self.precompute, segment.token_ids)

    def ensure_chunk(self, segment: Segment) -> ChunkKV:
        """The chunk's KV from the store, precomputed and stored on a miss (the warm-up path)."""
        return self.store.get_or_compute(segment.chunk_key, lambda: self.compute_chunk_kv(segment))

    # --- prefill ----------------------------------------------------------------------------

    def steps(self, segments: Sequence[Segment], mode: str, spec: BlendSpec, capacity: int, remember: bool = True,
              token_scores: Optional[torch.Tensor] = None, salt: str = "") -> Generator[int, Optional[int], Prefilled]:
        """The prefill, yielding after every piece (a layer, or part of one: see blend_prefill_steps). `remember`: put the exact leading segments
        into the prefix cache now (serving does it after the first token, off the TTFT path).
        `salt`: the request's, for the prefix cache (chunk and turn keys already carry it)."""
        ids = token_ids(segments)
        N = len(ids)
        dev = self.model.device
        exact_len, exact_kv = self._exact_prefix(segments, mode, N, salt)
        reused = self._reused(segments, mode, exact_len)
        chunks = [(segments[i], span) for i, span in reused]
        forced = torch.ones(N, dtype=torch.bool, device=dev)
        for _, (s, e) in chunks:
            forced[min(s + self.recompute_chunk_head, e):e] = False  # chunk heads stay forced (their own sinks)
        forced[N - 1] = True
        turn_tokens = sum(int((~forced[s:e]).sum()) for seg, (s, e) in chunks if seg.kind == "turn")

        t0 = time.perf_counter()
        computed = {seg.chunk_key: self._compute_and_store(seg) for seg, _ in chunks
                    if seg.kind == "chunk" and not self.store.contains(seg.chunk_key)}
        compute_s = time.perf_counter() - t0
        stored_keys = [seg.chunk_key for seg, _ in chunks if seg.chunk_key not in computed]
        cache = KVCache.allocate(self.model, max(capacity, N))
        ids_t = torch.tensor(ids, device=dev)
        spans_ = [span for _, span in chunks]
        keys = [seg.chunk_key for seg, _ in chunks]

        def blend(source: _ChunkSource) -> Generator[int, Optional[int], PrefillResult]:
            inp = PrefillInput(ids_t, forced, exact_len, exact_kv, spans_, source.layer if chunks else None,
                               chunk_sensitivity=source.sensitivity, token_scores=token_scores)
            return blend_prefill_steps(self.model, inp, spec, cache)

        loader = LayerPrefetcher(self.store, stored_keys, self.model.cfg.num_layers) if stored_keys else None
        try:
            result = yield from blend(_ChunkSource(keys, computed, loader))
        except ChunkMissing as e:
            # evicted or found corrupt mid-stream: recompute it and serve every chunk from memory
            log.warning("chunk %s vanished during prefill; recomputing it", e.key)
            loader.close()
            computed[e.key] = self._compute_and_store(next(seg for seg, _ in chunks if seg.chunk_key == e.key))
            kvs = {seg.chunk_key: computed.get(seg.chunk_key) or self.ensure_chunk(seg) for seg, _ in chunks}
            result = yield from blend(_ChunkSource(keys, kvs, None))
        finally:
            if loader is not None:
                loader.close()
        tiers: dict[str, int] = {}
        for key in stored_keys:
            if key not in computed:
                tier = loader.tiers.get(key, "cpu") if loader else "cpu"
                tiers[tier] = tiers.get(tier, 0) + 1
        reused_at = {i for i, _ in reused}
        computed_turns = [i for i, (seg, (s, _)) in enumerate(zip(segments, spans(segments)))
                          if seg.kind == "turn" and s >= exact_len and i not in reused_at and mode in BLEND_MODES
                          and self.reuse_turns]
        exact_segments = 0 if mode == "full_prefill" else min(reused_at, default=len(segments) - 1)
        pre = Prefilled(result, tiers, len(computed), compute_s, loader.total_load_seconds if loader else 0.0,
                        turn_tokens, computed_turns, exact_segments)
        if remember:
            self.remember_prefix(segments, pre, salt)
        return pre

    def remember_prefix(self, segments: Sequence[Segment], pre: Prefilled, salt: str = "") -> None:
        """Keep the exact leading segments for later requests (never a blended one: its KV is approximate)."""
        self.prefix_cache.insert(list(segments), pre.exact_segments, pre.result.cache.k, pre.result.cache.v, salt)

    def _exact_prefix(self, segments: Sequence[Segment], mode: str, N: int, salt: str):
        if mode == "full_prefill":
            return 0, None
        exact_len, entry = self.prefix_cache.lookup(list(segments), N - 1, salt)
        if entry is None:
            return 0, None
        return exact_len, (entry.k[:, :, :exact_len], entry.v[:, :, :exact_len])

    def _reused(self, segments: Sequence[Segment], mode: str, exact_len: int) -> list[tuple[int, tuple[int, int]]]:
        """(segment index, span) of the chunks, and the stored turns, whose KV this prefill reuses."""
        if mode not in BLEND_MODES:
            return []
        return [(i, (s, e)) for i, (seg, (s, e)) in enumerate(zip(segments, spans(segments)))
                if exact_len <= s < e and (seg.kind == "chunk" or (seg.kind == "turn" and self.reuse_turns and self.store.contains(seg.chunk_key)))]

    def _compute_and_store(self, segment: Segment) -> ChunkKV:
        """A chunk missed everywhere: computed now for this prefill; the store keeps it for the
        next one (slow tiers are written in the background)."""
        kv = self.compute_chunk_kv(segment)
        self.store.put(segment.chunk_key, kv)
        return kv


class _ChunkSource:
    """Per-layer chunk KV in span order, from memory (computed now) or the layer prefetcher."""

    def __init__(self, keys: list[str], in_memory: dict[str, ChunkKV], loader: Optional[LayerPrefetcher]):
        self.keys = keys
        self.in_memory = in_memory
        self.loader = loader

    def layer(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loaded = iter(self.loader.layer(layer)) if self.loader is not None else iter(())
        return [(kv.keys[layer], kv.values[layer]) if (kv := self.in_memory.get(key)) is not None else next(loaded)
                for key in self.keys]

    def sensitivity(self) -> list[Optional[torch.Tensor]]:
        loaded = iter(self.loader.sensitivity()) if self.loader is not None else iter(())
        return [kv.sensitivity if (kv := self.in_memory.get(key)) is not None else next(loaded) for key in self.keys]
