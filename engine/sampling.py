"""Sampling parameters and the per-request sampler (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


# Below this a temperature is greedy (as in vLLM): dividing logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = 16  # None: up to the context length (resolved by the engine)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1           # -1: off
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class Sampler:
    """One per request, so a seeded request gives the same tokens whatever it is batched with."""

    def __init__(self, params: SamplingParams, default_seed: int):
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else default_seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> token id."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
