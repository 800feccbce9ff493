"""Driving a step generator (a prefill in pieces): to its end, or for a budget of computed tokens."""

from __future__ import annotations

import inspect
import time
from typing import Generator, Optional, TypeVar

T = TypeVar("T")


def pause(stats, computed: int) -> Generator[int, Optional[int], Optional[int]]:
    """Yield a piece's computed tokens, counting the time until the caller resumes as
    `stats.paused_s` (a PrefillStats'); the caller's row limit for the next piece comes back."""
    t = time.perf_counter()
    limit = yield computed
    stats.paused_s += time.perf_counter() - t
    return limit


def run_to_end(steps: Generator[object, None, T]) -> T:
    """Drive a step generator to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def run_for(steps: Generator[int, Optional[int], T], budget: int) -> tuple[Optional[T], int]:
    """Advance a prefill until it has computed `budget` tokens: each piece it yields reports its
    computed tokens, and what is left of the budget goes back in as the next piece's row limit
    (a blend piece has at least `blend.MIN_PIECE_ROWS` rows). Returns (its result if it finished, else None (it
    can go on), the tokens computed)."""
    spent = 0
    while spent < budget:
        try:
            fresh = inspect.getgeneratorstate(steps) == inspect.GEN_CREATED
            spent += next(steps) if fresh else steps.send(budget - spent)
        except StopIteration as done:
            return done.value, spent
    return None, spent
