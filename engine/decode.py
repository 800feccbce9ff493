"""One decode step for a batch of sequences, each with its own fused KV cache.

The linear layers run on the whole batch at once (that is where batching pays on CPU and
GPU alike); attention runs per sequence over its own cache length: on CPU in one compiled call
per layer for the whole batch (engine/native.py), elsewhere as a loop of torch ops.
"""

from __future__ import annotations

from typing import Callable, Collection, Generator, Optional

import torch

from engine import native
from engine.attention import append_attend_torch
from engine.blend import KVCache
from engine.model import Transformer


@torch.inference_mode()
def decode_step(model: Transformer, caches: list[KVCache], token_ids: list[int]) -> torch.Tensor:
    """Append one token to each cache; return next-token logits [B, V] (float32)."""
    c = model.cfg
    dev = model.device
    lengths = [cache.length for cache in caches]
    positions = torch.tensor(lengths, device=dev)                                 # [B]
    cos, sin = model.rope.cos_sin(positions, max(lengths) + 1)                    # [B, D], for every layer
    h = model.embed(torch.tensor(token_ids, device=dev))                          # [B, hidden]
    B, H, D = len(caches), c.num_heads, c.head_dim
    append_attend = (native.append_attend_op() if dev.type == "cpu" else None) or append_attend_torch
    k_caches, v_caches = [cache.k for cache in caches], [cache.v for cache in caches]
    for layer in range(c.num_layers):
        q, k, v = model.qk_rotated(layer, h, cos, sin)                           # [H|Hkv, B, D]
        q = q * D ** -0.5  # once for the batch, not per sequence's scores
        attn = torch.empty(B, H, D, dtype=q.dtype, device=dev)
        append_attend(q, k, v, k_caches, v_caches, lengths, layer, attn)
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
