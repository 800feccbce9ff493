"""Background threads whose pending work can be waited for (the store's writer and loader)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

log = logging.getLogger(__name__)


class Workers:
    """A thread pool that logs a failed task instead of raising it, and can be drained."""

    def __init__(self, threads: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending: set[Future] = set()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("kvstore background task %s failed", getattr(fn, "__name__", fn))

        future = self._pool.submit(run)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self) -> None:
        """Wait until no task is pending, including ones submitted while waiting."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            wait(pending)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
