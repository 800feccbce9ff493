"""Blend prefill: one layer loop for every mode.

Each prompt token is one of three kinds:
- exact: its KV comes from the prefix cache (same tokens at the same positions); never computed;
- cached: a chunk token whose KV was precomputed with the chunk alone (approximate here);
- forced: everything else (prefix/suffix tokens, chunk heads, the last token); always computed.

The modes differ only in which tokens are computed at each layer:
- full_prefill / prefix_cache: all non-exact tokens, every layer (no cached tokens);
- full_reuse: forced tokens only, every layer; cached tokens use their chunk KV as is;
- cacheblend: all non-exact tokens up to and including the first check layer; at each check
  layer the HKVD tokens among the still-computed chunk tokens are kept (`ceil(r * n)` of the
  n chunk tokens) and the rest stop; later layers compute only forced + kept tokens. The signal
  (config/settings.py) says how a check ranks. "stored" and "attended" choose at layer 0 by the
  stored sensitivity before computing it, so a dropped token is never computed; "attended"
  weighs each ranking by the question's attention to the token (the rows after the last chunk;
  at layer 0 from a look-ahead over the stored KV, engine/lookahead.py). Without stored
  sensitivity (e.g. a prompt of conversation turns only) value deviation ranks, from layer 1.
Computed tokens write fresh K, V into the fused cache; every query attends over the whole fused
cache with an exact causal mask by position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

import torch

from config.settings import READS_SENSITIVITY, STORED_RANKING
from engine.attention import CausalPlan, causal_attention
from engine.lookahead import lookahead_layers, question_mass
from engine.model import Transformer
from engine.request import BlendSpec
from engine.selection import attention_mass, kv_deviation, num_selected, select_hkvd, select_pooled, span_sensitivity
from engine.steps import pause, run_to_end

ChunkLayerFn = Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]  # layer -> [(k_pre, v)] per span


@dataclass
class KVCache:
    """One sequence's fused cache. k holds post-RoPE keys."""
    k: torch.Tensor  # [L, Hkv, capacity, D]
    v: torch.Tensor  # [L, Hkv, capacity, D]
    length: int = 0

    @classmethod
    def allocate(cls, model: Transformer, capacity: int) -> "KVCache":
        c = model.cfg
        shape = (c.num_layers, c.num_kv_heads, capacity, c.head_dim)
        return cls(torch.empty(shape, dtype=model.dtype, device=model.device), torch.empty(shape, dtype=model.dtype, device=model.device))


@dataclass
class PrefillInput:
    token_ids: torch.Tensor                       # [N]
    forced: torch.Tensor                          # [N] bool: always computed
    exact_len: int = 0                            # leading tokens whose KV is exact
    exact_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # ([L, Hkv, exact_len, D] post-RoPE, same for V)
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of cached chunk tokens
    chunk_layer: Optional[ChunkLayerFn] = None    # per-layer chunk KV in span order
    chunk_sensitivity: Optional[Callable[[], list[Optional[torch.Tensor]]]] = None  # per span [e - s], or None
    collect_pre_rope: bool = False                # also return every token's pre-RoPE K (chunk precompute)
    token_scores: Optional[torch.Tensor] = None   # [N] caller-given scores; check layers rank by these instead of the KV deviation

    def write_stored(self, layer: int, K: torch.Tensor, V: torch.Tensor, stats: "PrefillStats", chunks: bool) -> None:
        """Write the layer's exact prefix KV and, with `chunks`, every chunk's stored KV (K
        pre-RoPE until placed) into K, V: [Hkv, N, D]; the wait for chunk KV is stats.kv_wait_s."""
        if self.exact_len:
            K[:, : self.exact_len] = self.exact_kv[0][layer]
            V[:, : self.exact_len] = self.exact_kv[1][layer]
        if chunks:
            t0 = time.perf_counter()
            layer_kv = self.chunk_layer(layer)
            stats.kv_wait_s += time.perf_counter() - t0
            for (s, e), (kc, vc) in zip(self.chunk_spans, layer_kv):
                K[:, s:e] = kc
                V[:, s:e] = vc


@dataclass
class PrefillStats:
    num_tokens: int = 0
    exact_tokens: int = 0
    cached_tokens: int = 0
    computed_per_layer: list[int] = field(default_factory=list)
    selected: dict[int, list[int]] = field(default_factory=dict)  # check layer -> positions kept
    deviation: dict[int, torch.Tensor] = field(default_factory=dict)  # check layer -> [n candidates] (inspect aid)
    candidates: dict[int, list[int]] = field(default_factory=dict)    # check layer -> candidate positions
    kv_wait_s: float = 0.0
    paused_s: float = 0.0      # between layers, while the engine decoded other requests
    selection_s: float = 0.0   # ranking at the check layers, and the attended signal's look-ahead (but its KV wait)
    compute_s: float = 0.0
    layer_compute_s: list[float] = field(default_factory=list)

    @property
    def recomputed_tokens(self) -> int:
        """Tokens whose KV is fresh in the last layer (what 'recomputed' means to users)."""
        return self.computed_per_layer[-1] if self.computed_per_layer else 0


@dataclass
class PrefillResult:
    cache: KVCache
    logits: torch.Tensor  # [V] float32, last prompt token
    stats: PrefillStats
    pre_rope_k: Optional[torch.Tensor] = None  # [L, Hkv, N, D] when collected


def blend_prefill(model: Transformer, inp: PrefillInput, spec: BlendSpec, cache: KVCache) -> PrefillResult:
    return run_to_end(blend_prefill_steps(model, inp, spec, cache))


MIN_PIECE_ROWS = 64  # fewer rows per GEMM and attention call cost more in overhead than they bound


def _piece_end(start: int, rows: int, limit: Optional[int]) -> int:
    return rows if limit is None else min(rows, start + max(int(limit), MIN_PIECE_ROWS))


def _kept(stats: PrefillStats, layer: int, is_cand: torch.Tensor, cand_pos: torch.Tensor, keep: torch.Tensor,
          scores: torch.Tensor) -> torch.Tensor:
    """Record a check layer's choice. is_cand: [S] bool, cand_pos: [n] their positions, keep:
    indices into cand_pos, scores: [n] what ranked them -> [S] bool: the rows computed on."""
    stats.selected[layer], stats.candidates[layer], stats.deviation[layer] = cand_pos[keep].tolist(), cand_pos.tolist(), scores
    keep_mask = ~is_cand
    keep_mask[is_cand.nonzero().squeeze(1)[keep]] = True
    return keep_mask


@torch.inference_mode()
def blend_prefill_steps(model: Transformer, inp: PrefillInput, spec: BlendSpec,
                        cache: KVCache) -> Generator[int, Optional[int], PrefillResult]:
    """The blend prefill in pieces, yielding after each the tokens it computed, so a run can be
    paused (between decode steps, or for a request that comes first). A piece is a whole layer,
    or, when the caller sends a row limit, that many of a layer's rows (chunked prefill inside a
    layer: a check layer projects its rows in pieces, then selects, then finishes its kept rows
    in pieces)."""
    c = model.cfg
    N = inp.token_ids.numel()
    dev = model.device
    positions = torch.arange(N, device=dev)
    stats = PrefillStats(num_tokens=N, exact_tokens=inp.exact_len)

    is_cached = torch.zeros(N, dtype=torch.bool, device=dev)
    for s, e in inp.chunk_spans:
        is_cached[s:e] = True
    is_cached &= ~inp.forced
    is_cached[: inp.exact_len] = False
    chunk_pos = positions[is_cached]                       # [n] cached chunk tokens
    n_chunk = chunk_pos.numel()
    stats.cached_tokens = n_chunk
    if n_chunk and inp.chunk_layer is None:
        raise ValueError("chunk spans given without a chunk KV source")

    after_exact = positions >= inp.exact_len
    if spec.check_layers or n_chunk == 0:
        active = positions[after_exact]                     # compute every non-exact token first
    else:
        active = positions[after_exact & ~is_cached]        # full_reuse: never compute chunk tokens
    check = dict(zip(spec.check_layers, spec.ratios))
    first_check = min(spec.check_layers) if spec.check_layers else None
    sensitivity = None                                      # [N] stored sensitivity, for the signals that rank by it
    if spec.signal in READS_SENSITIVITY and first_check is not None and inp.token_scores is None:
        sensitivity = span_sensitivity(inp.chunk_sensitivity() if inp.chunk_sensitivity else [], inp.chunk_spans, N, dev)
        if spec.signal in STORED_RANKING and sensitivity is None and first_check == 0 and 1 not in check and c.num_layers > 1:
            # no stored ranking: value deviation ranks instead, and at layer 0 a chunk token's KV
            # is exact (it depends on the token alone), so it deviates first at layer 1
            check[1] = check.pop(0)
            first_check = min(check)

    pre_rope = torch.empty((c.num_layers, c.num_kv_heads, N, c.head_dim), dtype=model.dtype, device=dev) if inp.collect_pre_rope else None
    limit = yield 0                                         # the caller's row limit (None: whole layers)
    t_start = time.perf_counter()
    placed = 0                                              # layers below this already hold the placed chunk KV
    if spec.signal == "attended" and sensitivity is not None and first_check == 0 and n_chunk:
        # a sensitive token the question never reads costs little stale (root: early attention piles onto delimiters)
        mass, limit = yield from question_mass(model, inp, cache, stats, positions[after_exact & ~is_cached], chunk_pos)
        sensitivity[chunk_pos] *= mass.sqrt()
        placed = lookahead_layers(c.num_layers).stop
        stats.selection_s += time.perf_counter() - t_start - stats.paused_s - stats.kv_wait_s
    h = model.embed(inp.token_ids[active])                  # [S, hidden]
    plan = None                                             # attention masks for the whole current `active`
    for layer in range(c.num_layers):
        t_layer, paused, piece = time.perf_counter(), stats.paused_s, 0
        last = layer == c.num_layers - 1
        K = cache.k[layer, :, :N]                           # [Hkv, N, D] views into the fused cache
        V = cache.v[layer, :, :N]
        # else (no stored sensitivity) the check layer ranks by value deviation
        chosen_early = layer == first_check and spec.signal in STORED_RANKING and sensitivity is not None
        if chosen_early:
            # the stored ranking needs no fresh KV: the tokens it drops are not computed even here
            t0 = time.perf_counter()
            is_cand = is_cached[active]                     # [S] active chunk tokens
            cand_pos = active[is_cand]
            scores = sensitivity[cand_pos]                  # [n]
            keep = select_hkvd(scores, num_selected(check[layer], n_chunk))
            keep_mask = _kept(stats, layer, is_cand, cand_pos, keep, scores)
            h, active, plan = h[keep_mask], active[keep_mask], None
            stats.selection_s += time.perf_counter() - t0
        S = int(active.numel())
        stats.computed_per_layer.append(S)
        needs_chunk_kv = bool(n_chunk) and layer >= placed and (layer in check or first_check is None or layer > first_check)
        inp.write_stored(layer, K, V, stats, needs_chunk_kv)
        if layer in check and not chosen_early:
            # the selection ranks every active token's fresh K/V: project them all (in pieces) first
            parts, a = [], 0
            while a < S:
                b = _piece_end(a, S, limit)
                parts.append(model.qkv(layer, h[a:b]))      # pre-RoPE, [H|Hkv, b - a, D]
                if limit is not None:  # split: the selection and kept rows come in pieces of their own
                    limit = yield from pause(stats, b - a)
                a, piece = b, b - a
            q, k, v = parts[0] if len(parts) == 1 else (torch.cat(t, dim=1) for t in zip(*parts))
            if pre_rope is not None:
                pre_rope[layer][:, active] = k
            t0 = time.perf_counter()
            is_cand = is_cached[active]                     # [S] active chunk tokens
            cand_pos = active[is_cand]
            num_keep = num_selected(check[layer], n_chunk)
            if inp.token_scores is not None:  # research: a ranking the caller computed (e.g. an oracle's)
                deviation = inp.token_scores.to(dev)[cand_pos]
            elif spec.signal == "random":  # control: as many tokens, chosen without looking at the KV
                deviation = torch.rand(cand_pos.numel(), generator=torch.Generator().manual_seed(N + layer)).to(dev)
            else:
                fresh = (k if spec.signal == "key" else v)[:, is_cand]
                deviation = kv_deviation(fresh, (K if spec.signal == "key" else V)[:, cand_pos])
            ranked_s = time.perf_counter() - t0
            if needs_chunk_kv:
                K[:, chunk_pos] = model.rotate(K[:, chunk_pos], chunk_pos, N)  # place chunk K at its positions
            K[:, active] = model.rotate(k, active, N)
            V[:, active] = v
            q = model.rotate(q, active, N)
            t0 = time.perf_counter()
            if spec.signal == "attended" and n_chunk and inp.token_scores is None:
                # a token's stale V changes a reader's output by its attention weight times the
                # deviation: weigh by what the question (every row after the last chunk) reads
                question = active > chunk_pos[-1]
                deviation = deviation.sqrt() * attention_mass(q[:, question], active[question], K, cand_pos)
            if spec.signal == "sensitivity" and layer == first_check and sensitivity is not None:
                keep = select_pooled(deviation, sensitivity[cand_pos], num_keep, num_selected(spec.pool, n_chunk))
            else:
                keep = select_hkvd(deviation, num_keep)
            keep_mask = _kept(stats, layer, is_cand, cand_pos, keep, deviation)
            stats.selection_s += ranked_s + time.perf_counter() - t0
            q, h, active = q[:, keep_mask], h[keep_mask], active[keep_mask]
            if last:  # only the last token's output is needed past the final KV write
                q, h, active = q[:, -1:], h[-1:], active[-1:]
            plan, S = None, int(active.numel())
            h_next, a = None, 0
            while a < S:  # every K, V of this layer is written: the kept rows attend in any pieces
                b = _piece_end(a, S, limit)
                if a == 0 and b == S:
                    plan = CausalPlan(active, N, model.dtype)
                    h_next = model.finish_layer(layer, h, causal_attention(q, K, V, plan))
                else:
                    h_next = torch.empty_like(h) if h_next is None else h_next
                    h_next[a:b] = model.finish_layer(layer, h[a:b], causal_attention(q[:, a:b], K, V, CausalPlan(active[a:b], N, model.dtype)))
                if b < S:
                    limit = yield from pause(stats, b - a)
                a, piece = b, b - a
            h = h_next
        else:
            if needs_chunk_kv:
                K[:, chunk_pos] = model.rotate(K[:, chunk_pos], chunk_pos, N)
            h_next, a = None, 0
            while a < S:
                b = _piece_end(a, S, limit)
                pos = active[a:b]
                q, k, v = model.qkv(layer, h[a:b])          # pre-RoPE, [H|Hkv, b - a, D]
                if pre_rope is not None:
                    pre_rope[layer][:, pos] = k
                K[:, pos] = model.rotate(k, pos, N)
                V[:, pos] = v
                if last:  # only the last token's output is needed past the final KV write
                    if b == S:
                        q_last = model.rotate(q[:, -1:], pos[-1:], N)
                        h_next = model.finish_layer(layer, h[-1:], causal_attention(q_last, K, V, CausalPlan(pos[-1:], N, model.dtype)))
                elif a == 0 and b == S:  # the whole layer: its masks serve every layer until `active` changes
                    plan = plan or CausalPlan(active, N, model.dtype)
                    h_next = model.finish_layer(layer, h, causal_attention(model.rotate(q, pos, N), K, V, plan))
                else:
                    h_next = torch.empty_like(h) if h_next is None else h_next
                    h_next[a:b] = model.finish_layer(layer, h[a:b], causal_attention(model.rotate(q, pos, N), K, V, CausalPlan(pos, N, model.dtype)))
                if b < S:
                    limit = yield from pause(stats, b - a)
                a, piece = b, b - a
            h = h_next
        stats.layer_compute_s.append(time.perf_counter() - t_layer - (stats.paused_s - paused))
        limit = yield from pause(stats, piece)
    logits = model.logits(h[-1:])[0]
    cache.length = N
    stats.compute_s = time.perf_counter() - t_start - stats.kv_wait_s - stats.paused_s
    return PrefillResult(cache, logits, stats, pre_rope)

