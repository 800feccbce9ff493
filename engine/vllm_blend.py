"""The blend inside a vLLM worker: a request's prompt and chunk spans in, its fused KV out.

The same `Prefiller` as the native engine (chunk keys, the tiered KV store, precompute on a miss,
HKVD selection), on vLLM's loaded layers (`engine/vllm_model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Optional, Sequence

from config.settings import Settings
from engine.chunks import Precompute
from engine.prefill import Prefilled, Prefiller
from engine.prefix_cache import PrefixCache
from engine.request import BlendParams, BlendSpec, RequestError
from engine.resolve import BLEND_MODES, resolve_blend
from engine.segments import Segment
from engine.vllm_model import VllmTransformer
from kvstore import build_store


@dataclass(frozen=True)
class BlendRequest:
    """What a request's `kv_transfer_params["cacheblend"]` asks for, checked against its prompt
    and resolved once, on the scheduler side."""
    chunks: tuple[tuple[int, int], ...]              # [start, end) token spans whose KV is reused
    params: BlendParams                              # as the client sent them (they salt its blocks)
    mode: str
    spec: BlendSpec
    num_tokens: int                                  # the prompt's
    salt: str = ""                                   # isolates its chunk keys (a tenant's, or the request's cache_salt)
    salts: tuple[str, ...] = ()                      # one per chunk, where given: the salt of that chunk's key instead

    @property
    def end(self) -> int:
        """The blend provides the whole prompt but its last token, the text after the last chunk
        computed among its recomputed tokens as in the native engine (a blend that stopped at the
        last chunk would compute that chunk's last token in full, as the last of its input); vLLM
        computes the last token over it, which gives the first output token."""
        return self.num_tokens - 1

    @classmethod
    def parse(cls, raw: object, num_prompt_tokens: int, settings: Settings, num_layers: int,
              salt: str = "") -> Optional["BlendRequest"]:
        """None when `raw` asks for no blend; RequestError naming the field at fault."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise RequestError("kv_transfer_params.cacheblend must be an object", "kv_transfer_params.cacheblend")
        unknown = set(raw) - {"chunks", "salts", *BlendParams.__dataclass_fields__}
        if unknown:
            raise RequestError(f"unknown field(s) {sorted(unknown)}", "kv_transfer_params.cacheblend")
        spans = raw.get("chunks") or []
        if not isinstance(spans, list) or not all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(type(x) is int for x in s) for s in spans):
            raise RequestError("chunks must be a list of [start, end) token positions", "kv_transfer_params.cacheblend.chunks")
        prev_end = 0
        for s, e in spans:
            if not prev_end <= s < e < num_prompt_tokens:
                raise RequestError(f"chunk span [{s}, {e}) must be non-empty, in order, not overlapping and before "
                                   f"the last token of the {num_prompt_tokens}-token prompt",
                                   "kv_transfer_params.cacheblend.chunks")
            prev_end = e
        salts = raw.get("salts") or ()
        if salts and (not isinstance(salts, list) or len(salts) != len(spans) or not all(isinstance(x, str) for x in salts)):
            raise RequestError("salts must be a list of strings, one per chunk", "kv_transfer_params.cacheblend.salts")
        params = BlendParams(**{k: v for k, v in raw.items() if k not in ("chunks", "salts")})
        if params.mode is not None and params.mode not in BLEND_MODES:
            raise RequestError(f"mode must be one of {', '.join(BLEND_MODES)} here (without a blend, send no "
                               f"cacheblend field)", "kv_transfer_params.cacheblend.mode")
        if not spans:
            return None
        mode, spec = resolve_blend(params, settings, num_layers, settings.recompute_ratio)
        return cls(tuple((s, e) for s, e in spans), params, mode, spec, num_prompt_tokens, salt, tuple(salts))


class VllmBlender:
    def __init__(self, settings: Settings, vllm_model, hf_config, model_dir: Path):
        from transformers import AutoTokenizer

        self.model = VllmTransformer(vllm_model, hf_config, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.store = build_store(settings, self.model.device)
        # no prefix cache or turn reuse of our own: vLLM's prefix cache keeps exact prefixes
        self.prefiller = Prefiller(self.model, tokenizer, self.store, Precompute.for_settings(tokenizer, settings),
                                   PrefixCache(0), settings.recompute_chunk_head, reuse_turns=False)

    def blend_steps(self, token_ids: Sequence[int], request: BlendRequest) -> Generator[int, Optional[int], Prefilled]:
        """The blend, yielding after every piece (a layer or part of one) the tokens it computed (so that vLLM can
        run forward steps for other requests in between); returns the prefill: the prompt's
        fused KV (`result.cache`, [L, Hkv, N, D], post-RoPE K) and how it was made."""
        segments = self.segments(token_ids, request)
        return (yield from self.prefiller.steps(segments, request.mode, request.spec, len(token_ids), remember=False))

    def segments(self, token_ids: Sequence[int], request: BlendRequest) -> list[Segment]:
        out, pos = [], 0
        salts = request.salts or (request.salt,) * len(request.chunks)
        for (s, e), salt in zip(request.chunks, salts):
            if s > pos:
                out.append(Segment("prefix", tuple(token_ids[pos:s])))
            out.append(self.prefiller.chunk_segment(token_ids[s:e], salt))
            pos = e
        if pos < len(token_ids):
            out.append(Segment("suffix", tuple(token_ids[pos:])))
        return out
