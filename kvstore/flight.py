"""Single-flight: concurrent calls for one key share one run of the work."""

from __future__ import annotations

import threading
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    """One in-progress run that other callers wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Optional[T] = None
        self.error: Optional[BaseException] = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def run(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """(result of `fn`, whether this caller ran it). Callers arriving while `fn` runs for
        `key` wait and get the same result, or the same exception."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, False  # type: ignore[return-value]
        try:
            flight.result = fn()
            return flight.result, True
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
