"""What travels into the engine (Request, resolved once) and out of it (RequestOutput)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from engine.sampling import SamplingParams
from engine.segments import Segment
from engine.stats import RequestStats


class RequestError(ValueError):
    """A request the engine cannot serve as given (reported to the client, never fatal)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class BlendParams:
    """A client's per-request prefill overrides; None falls back to the server's settings."""
    mode: Optional[str] = None
    recompute_ratio: Optional[float] = None
    check_layers: Optional[list[int]] = None
    check_ratios: Optional[list[float]] = None
    selection_signal: Optional[str] = None


@dataclass(frozen=True)
class BlendSpec:
    """How the blend prefill selects tokens: the resolved, validated form of BlendParams."""
    check_layers: tuple[int, ...] = ()  # empty: no selection (full_reuse, or every mode without chunks)
    ratios: tuple[float, ...] = ()      # one per check layer, non-increasing
    signal: str = "value"               # one of config.settings.SELECTION_SIGNALS
    pool: float = 0.5                   # "sensitivity": share pre-selected by value deviation
    ratio: Optional[float] = None       # the recompute_ratio it was resolved from (a label for stats and the controller; None: no selection)


@dataclass(frozen=True)
class Request:
    """A request resolved at submit (`LLMEngine.make_request`): later stages read only this."""
    request_id: str
    segments: tuple[Segment, ...]
    sampling: SamplingParams
    mode: str
    spec: BlendSpec
    user_turn: tuple[int, ...] = ()  # chat with turn reuse: the last user message rendered as a turn (kept after the prefill)
    salt: str = ""                   # isolates its prefix-cache and turn KV (its chunk keys carry it already)
    tenant: str = "default"          # who asked: a label for logs and metrics only (isolation is the salt)
    arrival_time: float = field(default_factory=time.perf_counter)

    @cached_property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t for seg in self.segments for t in seg.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids)

    @cached_property
    def chunk_keys(self) -> frozenset[str]:
        return frozenset(s.chunk_key for s in self.segments if s.chunk_key)


@dataclass
class RequestOutput:
    request_id: str
    text: str                    # new text since the previous output
    token_ids: list[int]         # new tokens since the previous output
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    error: Optional[str] = None
    stats: Optional[RequestStats] = None  # on the first token (TTFT) and on finish (the full record)
