"""One decode step for a batch of sequences, each with its own fused KV cache.

The linear layers run on the whole batch at once (that is where batching pays on CPU and
GPU alike); attention runs per sequence over its own cache length.
"""

from __future__ import annotations

from typing import Callable, Collection, Generator, Optional

import torch

from engine.attention import decode_attention
from engine.blend import KVCache
from engine.model import Transformer


@torch.inference_mode()
def decode_step(model: Transformer, caches: list[KVCache], token_ids: list[int]) -> torch.Tensor:
    """Append one token to each cache; return next-token logits [B, V] (float32)."""
    c = model.cfg
    dev = model.device
    positions = torch.tensor([cache.length for cache in caches], device=dev)     # [B]
    cos, sin = model.rope.cos_sin(positions, int(positions.max()) + 1)            # [B, D], for every layer
    h = model.embed(torch.tensor(token_ids, device=dev))                          # [B, hidden]
    B, H, D = len(caches), c.num_heads, c.head_dim
    for layer in range(c.num_layers):
        q, k, v = model.qk_rotated(layer, h, cos, sin)                           # [H|Hkv, B, D]
        q = q * D ** -0.5  # once for the batch, not per sequence's scores
        attn = torch.empty(B, H, D, dtype=q.dtype, device=dev)
        for b, cache in enumerate(caches):
            p = cache.length
            cache.k[layer, :, p] = k[:, b]
            cache.v[layer, :, p] = v[:, b]
            decode_attention(q[:, b], cache.k[layer, :, : p + 1], cache.v[layer, :, : p + 1], out=attn[b])
        h = model.finish_layer(layer, h, attn.transpose(0, 1))
    for cache in caches:
        cache.length += 1
    return model.logits(h)


def greedy_steps(model: Transformer, cache: KVCache, first_logits: torch.Tensor, max_tokens: int, eos_ids: Collection[int],
                 done: Optional[Callable[[list[int]], bool]] = None) -> Generator[None, None, list[int]]:
    """Greedy tokens from a prefilled cache: the first from `first_logits` [V], then one decode
    step per token, until EOS, `max_tokens`, or `done(tokens)`. Yields between steps (so a
    low-priority run can be paused)."""
    tokens = [int(first_logits.argmax())]
    while len(tokens) < max_tokens and tokens[-1] not in eos_ids and not (done and done(tokens)):
        yield
        tokens.append(int(decode_step(model, [cache], [tokens[-1]])[0].argmax()))
    return tokens
