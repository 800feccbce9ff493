"""AsyncEngine: the thread bridge between asyncio and the engine.

One thread owns the model: it calls `engine.step()` and runs model jobs (chunk precompute)
between steps. Scheduling is the engine's (engine/scheduler.py); this module only moves
requests in and outputs out. Outputs reach each request's asyncio queue through
`loop.call_soon_threadsafe`; finished requests are recorded in the metrics here, so every
path (ok, error, aborted, rejected) is counted once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from engine.llm_engine import LLMEngine
from engine.request import Request, RequestOutput
from engine.scheduler import QueueFull
from engine.stats import RequestStats
from server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["AsyncEngine", "QueueFull", "RequestStream"]


class RequestStream:
    """The outputs of one request, in order; `close()` aborts it unless it has finished."""

    def __init__(self, owner: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop, tenant: str):
        self._owner = owner
        self.request_id = request_id
        self.tenant = tenant
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncEngine:
    """The engine behind asyncio: submit requests, stream their outputs, run model jobs."""

    def __init__(self, engine: LLMEngine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self._cv = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting

    def submit(self, request: Request) -> RequestStream:
        """Queue a resolved request; raises QueueFull when the engine's queue is full."""
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop(), request.tenant)
        with self._cv:
            try:
                self.engine.add_request(request)
            except QueueFull:
                self.metrics.observe_request(RequestStats(status="rejected"))
                self.metrics.observe_tenant(request.tenant, "rejected")
                raise
            self._streams[request.request_id] = stream
            self._cv.notify()
        return stream

    async def run_job(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps (it may use the model) and return its result.
        Cancelling the caller skips `fn` if it has not started; a started one runs to its end."""
        return await asyncio.wrap_future(self.post_job(fn))

    def post_job(self, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        """Queue `fn` for the engine thread without waiting (from any thread, even while being
        cancelled). Jobs run one at a time in the order queued, so `fn` runs after every job
        queued before it has ended."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    async def shutdown(self, timeout_s: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout_s`, abort the rest
        and stop the thread (queued quality re-runs are dropped)."""
        self.engine.scheduler.accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        with self._cv:
            self._stop = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, max(1.0, deadline - time.monotonic()))

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); the engine drops it at its next step."""
        with self._cv:
            self.engine.abort(request_id)
            self._cv.notify()

    # --- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine, scheduler = self.engine, self.engine.scheduler
        while True:
            if not (self._stop or self._jobs or engine.has_work()):
                release_free_memory()  # as the engine goes idle (unlocked: at worst one trim more or less)
            with self._cv:
                while not (self._stop or self._jobs or engine.has_work()):
                    self._cv.wait()
                if self._stop and not (self._jobs or scheduler.has_work()):
                    return
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                _run_job(*job)
            try:
                outputs = engine.step()
            except Exception:
                log.exception("engine step failed; failing its requests")
                outputs = engine.fail_all("internal error in the engine")
            for out in outputs:
                self._deliver(out)
            self.metrics.set_queue(scheduler.num_running, scheduler.num_waiting)

    def _deliver(self, out: RequestOutput) -> None:
        with self._cv:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if out.finished:
            stats = out.stats or RequestStats(status="error")
            self.metrics.observe_request(stats)
            if stream is not None:
                self.metrics.observe_tenant(stream.tenant, stats.status)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the heap memory freed by finished requests (their fused KV) back to the OS: glibc
    keeps freed blocks for reuse, so an idle server's RSS would stay at its busiest level."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _run_job(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as e:
        future.set_exception(e)
