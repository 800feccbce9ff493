"""A request in flight: its sampler, detokenizer, prefill in progress, fused cache, tokens and stats.

`append` takes one sampled token and applies the stop rules (EOS, stop token IDs, stop
strings, max_tokens); `finish` closes the record. Both return the RequestOutput to send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Collection, Generator, Optional

import torch

from engine.blend import KVCache
from engine.detok import Detokenizer
from engine.request import Request, RequestOutput
from engine.sampling import Sampler
from engine.stats import RequestStats

if TYPE_CHECKING:
    from engine.prefill import Prefilled


@dataclass(eq=False)
class Sequence:
    request: Request
    sampler: Sampler
    detok: Detokenizer
    stats: RequestStats
    prefill: Optional["Generator[int, None, Prefilled]"] = None  # its prefill, while in progress
    cache: Optional[KVCache] = None
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    quality_logits: Optional[torch.Tensor] = None  # first-token logits kept for a quality re-run

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def chunk_keys(self) -> frozenset[str]:
        return self.request.chunk_keys

    def append(self, token: int, eos_ids: Collection[int]) -> RequestOutput:
        now = time.perf_counter()
        if self.output_ids:
            self.stats.itl_s.append(now - self.last_token_time)
        else:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token)
        p = self.request.sampling
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return self.finish("stop", self.detok.flush(), token)
        text, stop_hit = self.detok.add(token)
        if stop_hit is not None:
            return self.finish("stop", text, token)
        if len(self.output_ids) >= p.max_tokens:
            return self.finish("length", text + self.detok.flush(), token)
        return RequestOutput(self.request_id, text, [token])

    def finish(self, reason: str, text: str = "", last_token: Optional[int] = None, error: Optional[str] = None) -> RequestOutput:
        now = time.perf_counter()
        st = self.stats
        if reason == "abort":
            st.status = "aborted"
        elif reason == "error":
            st.status = "error"
        st.finish_reason = reason
        st.completion_tokens = len(self.output_ids)
        st.e2e_s = now - self.request.arrival_time
        st.decode_s = now - self.first_token_time if self.first_token_time else 0.0
        return RequestOutput(self.request_id, text, [last_token] if last_token is not None else [], True, reason, error, st)
