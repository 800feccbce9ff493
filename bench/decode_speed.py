"""Decode speed of our engine: seconds for a batch to decode a number of tokens, prefill excluded.

Used by `cacheblend bench peer` next to vLLM's figure for the same prompts (there: a generate
with 1 + n new tokens minus one with 1). Ours is timed directly around the decode steps: the
prompts are full-prefilled first (untimed), then `tokens` batched steps, greedy, EOS ignored.
"""

from __future__ import annotations

import time

import torch

from engine.blend import BlendSpec, KVCache, PrefillInput, blend_prefill
from engine.decode import decode_step
from engine.model import Transformer


@torch.inference_mode()
def decode_time(model: Transformer, prompts: list[list[int]], tokens: int) -> float:
    """prompts: B token-ID lists -> seconds for `tokens` decode steps of all B sequences at once."""
    caches, last = [], []
    for ids in prompts:
        t = torch.tensor(ids, device=model.device)
        cache = KVCache.allocate(model, len(ids) + tokens + 1)
        res = blend_prefill(model, PrefillInput(t, torch.ones(len(ids), dtype=torch.bool, device=model.device)), BlendSpec(), cache)
        caches.append(cache)
        last.append(int(res.logits.argmax()))
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decode_step(model, caches, last)            # [B, V]
        last = logits.argmax(-1).tolist()                    # reading the tokens waits for the device
    return time.perf_counter() - start


def decode_prompts(ids: list[int], batch: int, length: int) -> list[list[int]]:
    """`batch` different prompts of `length` tokens cut from one long prompt (shifted starts)."""
    step = max(1, (len(ids) - length) // max(1, batch))
    return [ids[i * step: i * step + length] for i in range(batch)]
