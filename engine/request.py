"""What travels into the engine (Request) and out of it (RequestOutput)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from engine.sampling import SamplingParams
from engine.segments import Segment


@dataclass
class BlendParams:
    """Per-request prefill settings; None falls back to the server's settings."""
    mode: Optional[str] = None
    recompute_ratio: Optional[float] = None
    check_layers: Optional[list[int]] = None
    check_ratios: Optional[list[float]] = None
    selection_signal: Optional[str] = None


@dataclass
class Request:
    request_id: str
    segments: list[Segment]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    blend: BlendParams = field(default_factory=BlendParams)
    arrival_time: float = field(default_factory=time.perf_counter)
    logprobs: int = 0  # top logprobs per generated token (0: none)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass
class RequestOutput:
    request_id: str
    text: str                    # new text since the previous output
    token_ids: list[int]         # new tokens since the previous output
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    error: Optional[str] = None
    stats: Optional[dict] = None  # on the first token (TTFT) and on finish (the full record)
