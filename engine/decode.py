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
    seq_len = int(positions.max()) + 1
    h = model.embed(torch.tensor(token_ids, device=dev))                          # [B, hidden]
    for layer in range(c.num_layers):
        q, k, v = model.qkv(layer, h)                                             # [H|Hkv, B, D]
        q = model.rotate(q, positions, seq_len)
        k = model.rotate(k, positions, seq_len)
        attn = torch.empty_like(q)
        for b, cache in enumerate(caches):
            p = cache.length
            cache.k[layer, :, p] = k[:, b]
            cache.v[layer, :, p] = v[:, b]
            attn[:, b] = decode_attention(q[:, b], cache.k[layer, :, : p + 1], cache.v[layer, :, : p + 1])
        h = model.finish_layer(layer, h, attn)
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
