"""AsyncEngine: the single-threaded engine driven by one thread, its outputs fed to asyncio.

Only the thread started here touches the model: it calls `engine.step()`, runs model jobs
(chunk precompute) between steps, and hands waiting requests to the engine one at a time,
just before the engine can prefill them. Holding requests back lets it choose the order:
after prefilling a request it prefers a waiting one that shares chunks with it (that chunk's
KV is hot), skipping the oldest waiting request at most `max_skips` times.

Outputs reach each request's asyncio queue through `loop.call_soon_threadsafe`. Finished
requests are recorded in the metrics here, so every path (ok, error, aborted) is counted once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from engine.llm_engine import LLMEngine
from engine.request import Request, RequestOutput
from server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFull(Exception):
    """More than `max_queue` requests are waiting (or the server is shutting down)."""


@dataclass
class _Waiting:
    request: Request
    chunk_keys: frozenset[str]
    skipped: int = 0


@dataclass
class _Consumer:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class RequestStream:
    """The outputs of one request, in order; `close()` aborts it unless it has finished."""

    def __init__(self, owner: "AsyncEngine", request_id: str, consumer: _Consumer):
        self._owner = owner
        self.request_id = request_id
        self._queue = consumer.queue
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out: RequestOutput = await self._queue.get()
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncEngine:
    """The engine behind asyncio: submit requests, stream their outputs, run model jobs."""

    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queue: int, max_skips: int = 8):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_skips = max_skips
        self._cv = threading.Condition()
        self._waiting: deque[_Waiting] = deque()  # not yet handed to the engine
        self._consumers: dict[str, _Consumer] = {}
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._last_keys: frozenset[str] = frozenset()
        self._failed: set[str] = set()  # requests dropped because a step raised
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # --- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self.engine.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def submit(self, request: Request) -> RequestStream:
        """Queue a validated request; raises QueueFull when the waiting queue is full."""
        with self._cv:
            if not self._accepting or self.num_waiting >= self.max_queue:
                self.metrics.observe_request({"status": "rejected"})
                raise QueueFull
            consumer = _Consumer(asyncio.get_running_loop())
            self._consumers[request.request_id] = consumer
            keys = frozenset(s.chunk_key for s in request.segments if s.chunk_key)
            self._waiting.append(_Waiting(request, keys))
            self._cv.notify()
        return RequestStream(self, request.request_id, consumer)

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its slot is free once the engine has dropped it."""
        with self._cv:
            waiting = next((w for w in self._waiting if w.request.request_id == request_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                self._consumers.pop(request_id, None)
                self.metrics.observe_request({"status": "aborted"})
            else:
                self.engine.abort(request_id)
            self._cv.notify()

    async def run_job(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps (it may use the model) and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._jobs.append((fn, future))
            self._cv.notify()
        return await asyncio.wrap_future(future)

    async def shutdown(self, timeout_s: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout_s`, abort the rest
        and stop the thread."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._consumers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._consumers):
            self.abort(request_id)
        with self._cv:
            self._stop = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, max(1.0, deadline - time.monotonic()))

    # --- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._stop or self._jobs or self._waiting or engine.has_work()):
                    self._cv.wait()
                if self._stop and not (self._jobs or self._waiting or engine.num_waiting or engine.num_running):
                    return  # queued quality shadow runs are dropped
                job = self._jobs.popleft() if self._jobs else None
                admit = None
                if self._waiting and engine.num_waiting == 0 and engine.num_running < engine.settings.max_num_seqs:
                    admit = self._pick()
            if job is not None:
                self._run_job(*job)
            if admit is not None:
                self._admit(admit)
            if engine.has_work():
                self._step()
            self.metrics.set_queue(engine.num_running, self.num_waiting)

    def _pick(self) -> _Waiting:
        """The next request to prefill (the caller holds the lock)."""
        chosen = self._waiting[0]
        if self._last_keys and chosen.skipped < self.max_skips:
            chosen = max(self._waiting, key=lambda w: len(w.chunk_keys & self._last_keys))  # ties: oldest
        for w in self._waiting:
            if w is chosen:
                break
            w.skipped += 1
        self._waiting.remove(chosen)
        self._last_keys = chosen.chunk_keys
        return chosen

    def _admit(self, waiting: _Waiting) -> None:
        request = waiting.request
        try:
            self.engine.add_request(request)
        except Exception as e:  # validated on arrival, so only a changed setting gets here
            log.warning("request %s refused by the engine: %s", request.request_id, e)
            self._deliver(RequestOutput(request.request_id, "", [], True, "error", str(e), {"status": "error"}))

    def _run_job(self, fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # A decode step failed: every request in the engine is dropped with an error.
            log.exception("engine step failed; failing its requests")
            ids = [s.request.request_id for s in list(self.engine.waiting) + self.engine.running]
            self._failed.update(ids)
            for request_id in ids:
                self.engine.abort(request_id)
            return
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        if out.finished:
            if out.request_id in self._failed:
                self._failed.discard(out.request_id)
                out.finish_reason, out.error = "error", "internal error in the engine"
                out.stats = {**(out.stats or {}), "status": "error"}
            self.metrics.observe_request(out.stats or {"status": "error"})
        with self._cv:
            consumer = self._consumers.pop(out.request_id, None) if out.finished else self._consumers.get(out.request_id)
        if consumer is None:  # aborted by its client meanwhile
            return
        try:
            consumer.loop.call_soon_threadsafe(consumer.queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

