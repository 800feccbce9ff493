"""Quality re-runs: a sampled share of served requests, re-run with full_prefill when idle.

Background work at the lowest priority: the engine advances it one layer or decode step at a
time, only when the scheduler has nothing to prefill or decode. Each finished re-run becomes a
QualitySample for the listeners (metrics) and, with the controller on, may move the ratio.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Collection, Generator, Optional

import torch

from config.settings import Settings
from engine.decode import greedy_steps
from engine.prefill import Prefilled, Prefiller
from engine.quality import QualitySample, QualitySampler, RatioController, first_token_kl, token_f1
from engine.request import BlendSpec, Request


@dataclass
class QualityJob:
    """A finished request to compare against its full prefill."""
    request: Request
    ratio: Optional[float]
    served_logits: torch.Tensor         # [V] the served first-token logits
    served_greedy: Optional[list[int]]  # the served answer's first tokens, if it was greedy


class QualityMonitor:
    def __init__(self, settings: Settings, prefiller: Prefiller, eos_ids: Collection[int]):
        self.prefiller = prefiller
        self.eos_ids = eos_ids
        self.compare_tokens = settings.quality_compare_tokens
        self.controller = RatioController(settings.recompute_ratio, settings.controller_min_ratio, settings.controller_max_ratio,
                                          settings.controller_target_agreement, settings.controller_step,
                                          settings.controller_window, settings.controller_hysteresis) if settings.controller_enabled else None
        self.ratio = self.controller.ratio if self.controller else settings.recompute_ratio
        self._sample = QualitySampler(settings.quality_sample_rate, settings.seed)
        self._jobs: deque[QualityJob] = deque()
        self._current: Optional[Generator[Optional[int], None, None]] = None
        self.on_quality: list[Callable[[QualitySample], None]] = []    # e.g. metrics
        self.on_controller: list[Callable[[str, float], None]] = []    # (decision, new ratio)

    def wants(self, mode: str) -> bool:
        """Whether to keep this request's first-token logits for a re-run (decided per request)."""
        return self._sample(mode)

    def submit(self, job: QualityJob) -> None:
        self._jobs.append(job)

    @property
    def in_progress(self) -> bool:
        return self._current is not None

    @property
    def num_queued(self) -> int:
        return len(self._jobs)

    def has_work(self) -> bool:
        return self.in_progress or bool(self._jobs)

    def step(self) -> None:
        """One layer or decode step of the current re-run."""
        if self._current is None:
            self._current = self._run(self._jobs.popleft())
        try:
            next(self._current)
        except StopIteration:
            self._current = None

    def _greedy(self, pre: Prefilled) -> Generator[None, None, list[int]]:
        return greedy_steps(self.prefiller.model, pre.result.cache, pre.result.logits, self.compare_tokens, self.eos_ids)

    def _run(self, job: QualityJob) -> Generator[Optional[int], None, None]:
        req = job.request
        capacity = req.num_prompt_tokens + self.compare_tokens
        full = yield from self.prefiller.steps(req.segments, "full_prefill", BlendSpec(), capacity)
        full_answer = yield from self._greedy(full)
        served = job.served_greedy
        if served is None:  # a sampled answer says nothing about the cache: decode greedily in the served mode
            again = yield from self.prefiller.steps(req.segments, req.mode, req.spec, capacity, salt=req.salt)
            served = yield from self._greedy(again)
        sample = QualitySample(req.request_id, req.mode, job.ratio, first_token_kl(full.result.logits, job.served_logits),
                               int(full.result.logits.argmax()) == int(job.served_logits.argmax()), token_f1(served, full_answer))
        for listener in self.on_quality:
            listener(sample)
        if self.controller is not None:
            decision = self.controller.observe(float(sample.top1_agree))
            if decision is not None:
                self.ratio = self.controller.ratio
                for listener in self.on_controller:
                    listener(decision, self.ratio)
