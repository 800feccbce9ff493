"""The question's look-ahead: which chunk tokens the question reads, before any is recomputed.

The stored ranking (each chunk token's context sensitivity, measured at precompute) says which
tokens can move in some context, not whether this prompt's question reads them, and a stale
token the question never reads costs little. So before the blend's first layer the rows every
mode computes (the prefix, chunk heads, the question: everything but cached chunk tokens) run
the early layers over the chunks' stored KV, as full reuse would, and the question's rows
(every row after the last chunk) say how much of their attention each chunk token gets. Those
rows' layers are under 1% of a full prefill's work; with the attention mass over every key it
took 0.26 s of a 2.4 s TTFT on the report split (BENCHMARKS.md, "The question's look-ahead").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator, Optional

import torch

from engine.attention import CausalPlan, causal_attention
from engine.model import Transformer
from engine.selection import attention_mass, sensitivity_layers
from engine.steps import pause

if TYPE_CHECKING:
    from engine.blend import KVCache, PrefillInput, PrefillStats


def lookahead_layers(num_layers: int) -> range:
    """The layers the question looks ahead through: those before the funnel's second check
    (0..7 of 30), whose tokens the first stage alone decides."""
    return range(max(1, sensitivity_layers(num_layers).stop - 1))


def question_mass(model: Transformer, inp: PrefillInput, cache: KVCache, stats: PrefillStats, rows: torch.Tensor,
                  chunk_pos: torch.Tensor) -> Generator[int, Optional[int], tuple[torch.Tensor, Optional[int]]]:
    """The question's attention to each chunk token, averaged over the look-ahead layers.

    rows: [S] sorted positions full reuse computes (past the exact prefix); chunk_pos: [n] the
    cached chunk positions -> ([n] float32, the caller's row limit for the next piece). Each
    layer is a piece of the prefill. The look-ahead layers of the fused cache end with the
    stored chunk KV placed at its positions; the blend overwrites the rows it computes."""
    N = inp.token_ids.numel()
    layers = lookahead_layers(model.cfg.num_layers)
    question = rows > chunk_pos[-1]
    plan = CausalPlan(rows, N, model.dtype)
    h = model.embed(inp.token_ids[rows])                                 # [S, hidden]
    mass = torch.zeros(chunk_pos.numel(), dtype=torch.float32, device=chunk_pos.device)
    for layer in layers:
        K, V = cache.k[layer, :, :N], cache.v[layer, :, :N]             # [Hkv, N, D]
        inp.write_stored(layer, K, V, stats, chunks=True)
        K[:, chunk_pos] = model.rotate(K[:, chunk_pos], chunk_pos, N)
        q, k, v = model.qkv(layer, h)                                    # pre-RoPE, [H|Hkv, S, D]
        K[:, rows] = model.rotate(k, rows, N)
        V[:, rows] = v
        q = model.rotate(q, rows, N)
        mass += attention_mass(q[:, question], rows[question], K, chunk_pos)
        if layer + 1 < layers.stop:
            h = model.finish_layer(layer, h, causal_attention(q, K, V, plan))
        limit = yield from pause(stats, int(rows.numel()))
    return mass / len(layers), limit
