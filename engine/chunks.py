"""Chunk KV precompute: each chunk's per-layer KV computed with the chunk alone.

Convention (a setting, versioned into every chunk key so KV made under another one is never
served):
- "sink": one sink token (BOS, else `<|im_start|>`) at position 0, the chunk at 1..T; the
  sink's KV is dropped. Without it the chunk's first token becomes its attention sink and its
  KV is far from what it is in a real prompt (the paper's code does the same).
- "prefix": the default prompt prefix (chat template head) in front instead. A chunk that
  follows that prefix in a request then has exactly the KV a full prefill would give it.
K is stored before RoPE, so it is placed at any position by rotating it there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.blend import BlendSpec, KVCache, PrefillInput, blend_prefill
from engine.model import Transformer
from kvstore.base import ChunkKV
from kvstore.keys import chunk_key

CONVENTION_VERSION = "v1"


@dataclass(frozen=True)
class Precompute:
    """How chunk KV is made for one model: the context tokens put in front of every chunk."""
    name: str                   # "sink" | "prefix"
    context: tuple[int, ...]    # token IDs computed before the chunk and dropped

    @property
    def tag(self) -> str:
        digest = hashlib.sha256(repr(self.context).encode()).hexdigest()[:16]
        return f"{self.name}-{CONVENTION_VERSION}-{digest}"


def sink_token_id(tokenizer) -> int:
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if im_start is None or im_start == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has neither a BOS nor an <|im_start|> token to use as the chunk sink")
    return im_start


def key_for(model: Transformer, pre: Precompute, token_ids: tuple[int, ...], kv_dtype: str) -> str:
    return chunk_key(token_ids, model.fingerprint, kv_dtype, pre.tag)


def precompute_chunk(model: Transformer, pre: Precompute, token_ids: tuple[int, ...]) -> ChunkKV:
    """Run the chunk after its context tokens; return its layers' pre-RoPE K and V."""
    ctx = len(pre.context)
    ids = torch.tensor(pre.context + tuple(token_ids), device=model.device)
    cache = KVCache.allocate(model, ids.numel())
    forced = torch.ones(ids.numel(), dtype=torch.bool, device=model.device)
    result = blend_prefill(model, PrefillInput(ids, forced, collect_pre_rope=True), BlendSpec(), cache)
    keys = result.pre_rope_k[:, :, ctx:].clone()   # [L, Hkv, T, D]
    values = cache.v[:, :, ctx:].clone()            # [L, Hkv, T, D]
    return ChunkKV(keys, values, 0, "computed")
