"""The one queue and admission policy: which request to prefill next, which to decode.

Plain Python (no torch), so the policy is tested on its own. A step may start the prefill of
one waiting request (it joins the running batch at once, but decodes only once `prefilled`) and
decode every running request that has its first token. One prefill is in progress at a time: the
engine advances it between decode steps. `add` and `abort` may be called from any thread.

Admission: the oldest waiting request, except that after a prefill a waiting request that
shares chunks with it goes first (that chunk's KV is hot), skipping an older one at most
`max_skips` times. At most `max_num_seqs` requests run; more than `max_queue` waiting is refused.
Background work (quality re-runs) runs only when the output says `idle`. `prefill_budget` sizes
the piece of the prefill that runs beside a decode step.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Optional, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def chunk_keys(self) -> frozenset[str]: ...


S = TypeVar("S", bound=Schedulable)


class QueueFull(Exception):
    """More than `max_queue` requests are waiting, or the scheduler no longer accepts any."""


@dataclass
class _Waiting(Generic[S]):
    seq: S
    skipped: int = 0


@dataclass
class SchedulerOutput(Generic[S]):
    aborted: list[S] = field(default_factory=list)   # to finish with "abort"
    prefill: Optional[S] = None                      # the prefill in progress (started now or earlier); running
    decode: list[S] = field(default_factory=list)    # running and prefilled

    @property
    def idle(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler(Generic[S]):
    def __init__(self, max_num_seqs: int, max_queue: int, max_skips: int = 8):
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.max_skips = max_skips
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting[S]] = deque()
        self._running: list[S] = []
        self._aborted: set[str] = set()
        self._last_keys: frozenset[str] = frozenset()
        self._prefilling: Optional[S] = None  # running, its prefill not finished
        self.accepting = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def add(self, seq: S) -> None:
        with self._lock:
            if not self.accepting or len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(_Waiting(seq))

    def abort(self, request_id: str) -> None:
        """Mark a request to drop at the next `schedule` (unknown IDs are ignored there)."""
        with self._lock:
            self._aborted.add(request_id)

    def schedule(self) -> SchedulerOutput[S]:
        with self._lock:
            out: SchedulerOutput[S] = SchedulerOutput(self._take_aborted())
            if self._prefilling is None and self._waiting and len(self._running) < self.max_num_seqs:
                self._prefilling = self._pick()
                self._running.append(self._prefilling)
            out.prefill = self._prefilling
            out.decode = [s for s in self._running if s is not self._prefilling]
            return out

    def prefilled(self, seq: S) -> None:
        """`seq` has its first token: it decodes from the next step, and another prefill may start."""
        with self._lock:
            if self._prefilling is seq:
                self._prefilling = None

    def finish(self, seq: S) -> None:
        """Drop a finished (or failed) request from the running batch."""
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
            if self._prefilling is seq:
                self._prefilling = None

    def drain(self) -> list[S]:
        """Remove and return every waiting and running request (a step failed for all of them)."""
        with self._lock:
            seqs = [w.seq for w in self._waiting] + self._running
            self._waiting.clear()
            self._running = []
            self._prefilling = None
            self._aborted.clear()
            return seqs

    def _take_aborted(self) -> list[S]:
        if not self._aborted:
            return []
        ids, self._aborted = self._aborted, set()
        dropped = [w.seq for w in self._waiting if w.seq.request_id in ids]
        dropped += [s for s in self._running if s.request_id in ids]
        self._waiting = deque(w for w in self._waiting if w.seq.request_id not in ids)
        self._running = [s for s in self._running if s.request_id not in ids]
        if self._prefilling is not None and self._prefilling.request_id in ids:
            self._prefilling = None
        return dropped

    def _pick(self) -> S:
        chosen = self._waiting[0]
        if self._last_keys and chosen.skipped < self.max_skips:
            chosen = max(self._waiting, key=lambda w: len(w.seq.chunk_keys & self._last_keys))  # ties: oldest
        for w in self._waiting:
            if w is chosen:
                break
            w.skipped += 1
        self._waiting.remove(chosen)
        self._last_keys = chosen.seq.chunk_keys
        return chosen.seq


PROBE_ROWS = 64  # the first piece, while a computed token's cost is not yet measured


def prefill_budget(max_rows: int, decoding: int, decode_s: float, row_s: Optional[float], slowdown: float) -> int:
    """Computed tokens (rows) of the prefill in progress to run after a decode step of `decoding`
    streams that took `decode_s`: at most `max_rows` less the decode rows (vLLM's
    max_num_batched_tokens counts both) and, with `slowdown` > 1, few enough that the whole step
    lasts about `slowdown` decode steps, at `row_s` seconds a row (None: not measured yet)."""
    rows = max(1, max_rows - decoding)
    if slowdown > 1:
        rows = min(rows, PROBE_ROWS if row_s is None else max(1, int((slowdown - 1) * decode_s / row_s)))
    return rows
