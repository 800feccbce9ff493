"""One decode step for a batch of sequences, each with its own fused KV cache.

The linear layers run on the whole batch at once (that is where batching pays on CPU and
GPU alike); attention runs per sequence over its own cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    gqa = c.num_heads != c.num_kv_heads
    for layer in range(c.num_layers):
        q, k, v = model.qkv(layer, h)                                             # [H|Hkv, B, D]
        q = model.rotate(q, positions, seq_len)
        k = model.rotate(k, positions, seq_len)
        attn = torch.empty_like(q)
        for b, cache in enumerate(caches):
            p = cache.length
            cache.k[layer, :, p] = k[:, b]
            cache.v[layer, :, p] = v[:, b]
            attn[:, b:b + 1] = F.scaled_dot_product_attention(
                q[None, :, b:b + 1], cache.k[None, layer, :, : p + 1], cache.v[None, layer, :, : p + 1], enable_gqa=gqa
            )[0]
        h = model.finish_layer(layer, h, attn)
    for cache in caches:
        cache.length += 1
    return model.logits(h)
