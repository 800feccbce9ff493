"""Chunk KV precompute: each chunk's per-layer KV computed with the chunk alone.

Convention (a setting, versioned into every chunk key so KV made under another one is never
served):
- "sink": one sink token (BOS, else `<|im_start|>`) at position 0, the chunk at 1..T; the
  sink's KV is dropped. Without it the chunk's first token becomes its attention sink and its
  KV is far from what it is in a real prompt (the paper's code does the same).
- "prefix": the default prompt prefix (chat template head) in front instead. A chunk that
  follows that prefix in a request then has exactly the KV a full prefill would give it.
- "passage": the prefix, then a neutral passage (the probe), in front. In a RAG prompt all but
  the first chunk follow another passage, and their KV is closer to one computed behind one.
K is stored before RoPE, so it is placed at any position by rotating it there.

With a probe (the "sensitivity" and "stored" selection signals) the chunk is run a second time with a fixed
probe passage between its context and itself, and each token's context sensitivity (how far its
mid-layer V moves, see engine/selection.py) is stored with the KV. It costs a second forward of
the chunk at precompute, nothing at request time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from config.settings import READS_SENSITIVITY
from engine.blend import KVCache, PrefillInput, blend_prefill
from engine.model import Transformer
from engine.prompt import default_prefix_ids
from engine.request import BlendSpec
from engine.selection import context_sensitivity, sensitivity_layers
from kvstore.base import ChunkKV
from kvstore.keys import chunk_key

if TYPE_CHECKING:
    from config.settings import Settings

CONVENTION_VERSION = "v1"

# Any neutral passage works: it only has to put other text in front of the chunk.
PROBE_TEXT = ("The river rises in the northern hills and flows south through farmland for about two "
              "hundred kilometres. Several small towns grew up along its banks in the nineteenth "
              "century, when mills and a railway line brought work to the valley. Today the area is "
              "known for its orchards, a museum of local history and a yearly music festival.\n\n")


@dataclass(frozen=True)
class Precompute:
    """How chunk KV is made for one model: the context tokens put in front of every chunk."""
    name: str                   # "sink" | "prefix" | "passage"
    context: tuple[int, ...]    # token IDs computed before the chunk and dropped
    probe: tuple[int, ...] = () # probe passage token IDs; empty: no sensitivity is measured

    @property
    def keeps_probed(self) -> bool:
        """Whether the stored KV is the run behind the probe, not the one behind the context alone
        ("passage" with a probe; without one, the passage is part of the context)."""
        return self.name == "passage" and bool(self.probe)

    @property
    def tag(self) -> str:
        digest = hashlib.sha256(repr((self.context, self.probe) if self.probe else self.context).encode()).hexdigest()[:16]
        return f"{self.name}{'+sens' if self.probe else ''}-{CONVENTION_VERSION}-{digest}"

    @classmethod
    def for_settings(cls, tokenizer, settings: "Settings") -> "Precompute":
        """The convention `--chunk-context` names; the probe only when the selection signal reads it.
        "passage" puts the probe passage in front of the chunk: behind the prefix as a second run
        when there is a probe (so the sensitivity costs one forward), else as part of the context."""
        with_probe = settings.selection_signal in READS_SENSITIVITY
        passage = tuple(tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
        probe = passage if with_probe else ()
        if settings.chunk_context == "sink":
            return cls("sink", (sink_token_id(tokenizer),), probe)
        prefix = default_prefix_ids(tokenizer, settings.chat_preamble)
        if settings.chunk_context == "passage" and not with_probe:
            return cls("passage", prefix + passage)
        return cls(settings.chunk_context, prefix, probe)


def sink_token_id(tokenizer) -> int:
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if im_start is None or im_start == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has neither a BOS nor an <|im_start|> token to use as the chunk sink")
    return im_start


def key_for(model: Transformer, pre: Precompute, token_ids: tuple[int, ...], kv_dtype: str, salt: str = "") -> str:
    return chunk_key(token_ids, model.fingerprint, kv_dtype, pre.tag, salt)


def precompute_chunk(model: Transformer, pre: Precompute, token_ids: tuple[int, ...]) -> ChunkKV:
    """Run the chunk after its context tokens (and after the probe too, when `pre` has one);
    return its layers' pre-RoPE K and V from the run the convention keeps, and its token
    sensitivity (how far V moved between the two runs) when there is a probe."""
    ctx = len(pre.context)
    alone, alone_cache = _run_after(model, pre.context, token_ids, collect_pre_rope=not pre.keeps_probed)
    kept, kept_cache, start, sensitivity = alone, alone_cache, ctx, None
    if pre.probe and token_ids:
        behind = ctx + len(pre.probe)
        probed, probed_cache = _run_after(model, pre.context + pre.probe, token_ids, collect_pre_rope=pre.keeps_probed)
        sensitivity = context_sensitivity(alone_cache.v[:, :, ctx:], probed_cache.v[:, :, behind:],
                                          sensitivity_layers(model.cfg.num_layers))
        if pre.keeps_probed:
            kept, kept_cache, start = probed, probed_cache, behind
    keys = kept.pre_rope_k[:, :, start:].clone()   # [L, Hkv, T, D]
    values = kept_cache.v[:, :, start:].clone()     # [L, Hkv, T, D]
    return ChunkKV(keys, values, 0, "computed", sensitivity)


def _run_after(model: Transformer, context: tuple[int, ...], token_ids: tuple[int, ...], collect_pre_rope: bool = False):
    ids = torch.tensor(context + tuple(token_ids), device=model.device)
    cache = KVCache.allocate(model, ids.numel())
    forced = torch.ones(ids.numel(), dtype=torch.bool, device=model.device)
    return blend_prefill(model, PrefillInput(ids, forced, collect_pre_rope=collect_pre_rope), BlendSpec(), cache), cache
