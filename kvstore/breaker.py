"""Fail fast while a remote service is down.

After a failure the breaker stays open for `retry_after_s`: calls return their fallback at
once instead of each paying a connect timeout. The first call after that tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Breaker:
    def __init__(self, name: str, errors: tuple[type[BaseException], ...], retry_after_s: float = 5.0,
                 on_error: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.retry_after_s = retry_after_s
        self._errors = errors
        self._on_error = on_error
        self._open_until = 0.0
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def call(self, what: str, fn: Callable[[], T], fallback: T) -> T:
        """`fn()`, or `fallback` if the service is known down or `fn` fails with one of `errors`."""
        if self.is_open:
            return fallback
        try:
            return fn()
        except self._errors as e:
            with self._lock:
                first = not self.is_open
                self._open_until = time.monotonic() + self.retry_after_s
            self._on_error()
            if first:
                log.warning("%s %s failed (%s: %s); using local tiers, retrying in %.0fs",
                            self.name, what, type(e).__name__, e, self.retry_after_s)
            return fallback
