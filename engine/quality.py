"""Live quality monitoring and the recompute-ratio controller.

A sampled share of served requests is re-run with `full_prefill` when the engine is idle (low
priority: never ahead of a waiting or running request). Against the served request it records
KL(full_prefill || served) of the first-token distributions, top-1 agreement, and token F1
between the greedy answers' first N tokens. The controller moves the recompute ratio within
[min, max] to keep the windowed top-1 agreement at the target, with a hysteresis band above it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class QualitySample:
    request_id: str
    mode: str
    ratio: Optional[float]
    kl: float
    top1_agree: bool
    f1: float


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in nats; logits: [V]. The one KL of the project
    (serving, eval, tests). Float64, because near-identical distributions (ratio 1.0, prefix
    reuse) give KLs of 1e-7 that float32 rounding turns into noise or negatives; clamped at 0."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


def token_f1(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Bag-of-tokens F1 between two sequences: token IDs here, normalised words in the eval
    (1.0 when both are empty, 0.0 when one is)."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


class RatioController:
    """Windowed top-1 agreement -> ratio up (below target), down (above target + band), or hold."""

    def __init__(self, ratio: float, min_ratio: float, max_ratio: float, target: float, step: float, window: int, hysteresis: float):
        self.ratio = min(max(ratio, min_ratio), max_ratio)
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.target, self.step, self.window, self.hysteresis = target, step, window, hysteresis
        self._agreements: list[float] = []

    def observe(self, agreement: float) -> Optional[str]:
        """Add one sample; after `window` samples decide and return "up" | "down" | "hold"."""
        self._agreements.append(agreement)
        if len(self._agreements) < self.window:
            return None
        mean = sum(self._agreements) / len(self._agreements)
        self._agreements.clear()
        if mean < self.target and self.ratio < self.max_ratio:
            self.ratio = min(self.max_ratio, round(self.ratio + self.step, 6))
            decision = "up"
        elif mean >= self.target + self.hysteresis and self.ratio > self.min_ratio:
            self.ratio = max(self.min_ratio, round(self.ratio - self.step, 6))
            decision = "down"
        else:
            decision = "hold"
        log.info("ratio controller: agreement %.3f (target %.3f) -> %s, ratio %.3f", mean, self.target, decision, self.ratio)
        return decision


class QualitySampler:
    """Decides which requests get a shadow full_prefill run (seeded, so tests are repeatable)."""

    def __init__(self, rate: float, seed: int):
        self.rate = rate
        self._rng = random.Random(seed)

    def __call__(self, mode: str) -> bool:
        return mode != "full_prefill" and self.rate > 0 and self._rng.random() < self.rate
