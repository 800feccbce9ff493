"""AsyncEngine with an engine double (no model): admission order by shared chunks, the queue
bound, aborts, jobs on the engine thread, and a failing step. Also the error field paths."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import SimpleNamespace

import pytest

from engine.request import Request, RequestOutput
from engine.sampling import SamplingParams
from engine.segments import Segment
from server.async_engine import AsyncEngine, QueueFull
from server.errors import field_path
from server.metrics import Metrics


class FakeEngine:
    """Prefill emits one token, each decode step one more, up to max_tokens; records the order
    in which requests were prefilled."""

    def __init__(self, max_num_seqs: int = 1):
        self.settings = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.waiting: deque = deque()
        self.running: list = []
        self.prefilled: list[str] = []
        self.fail_next_step = False
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    def add_request(self, request: Request) -> None:
        self.waiting.append(SimpleNamespace(request=request, tokens=0))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("decode failed")
        with self._lock:
            aborted, self._aborted = self._aborted, set()
        outputs = []
        for seq in [s for s in list(self.waiting) + self.running if s.request.request_id in aborted]:
            (self.waiting if seq in self.waiting else self.running).remove(seq)
            outputs.append(RequestOutput(seq.request.request_id, "", [], True, "abort", None, {"status": "aborted"}))
        if self.waiting and len(self.running) < self.settings.max_num_seqs:
            seq = self.waiting.popleft()
            self.prefilled.append(seq.request.request_id)
            self.running.append(seq)
            outputs.append(self._token(seq))
        elif self.running:
            outputs += [self._token(seq) for seq in list(self.running)]
        return outputs

    def _token(self, seq) -> RequestOutput:
        seq.tokens += 1
        done = seq.tokens >= seq.request.sampling.max_tokens
        if done:
            self.running.remove(seq)
        return RequestOutput(seq.request.request_id, "x", [1], done, "length" if done else None, None,
                             {"status": "ok", "completion_tokens": seq.tokens} if done else None)


def request(request_id: str, chunks: str = "", max_tokens: int = 1) -> Request:
    segments = [Segment("chunk", (1,), c * 64) for c in chunks] + [Segment("suffix", (2,))]
    return Request(request_id, segments, SamplingParams(max_tokens=max_tokens))


def sample(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value("cacheblend:requests_total", {"model_name": "m", "status": status})


async def hold_engine_thread(engine: AsyncEngine) -> threading.Event:
    """Park the engine thread in a job until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)

    asyncio.ensure_future(engine.run_job(job))
    await asyncio.to_thread(started.wait, 10)
    return release


async def drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def run_order(requests: list[Request], max_skips: int) -> list[str]:
    async def main() -> list[str]:
        fake = FakeEngine()
        engine = AsyncEngine(fake, Metrics("m"), max_queue=16, max_skips=max_skips)
        engine.start()
        release = await hold_engine_thread(engine)
        streams = [engine.submit(r) for r in requests]
        release.set()
        await asyncio.gather(*(drain(s) for s in streams))
        await engine.shutdown(1.0)
        return fake.prefilled

    return asyncio.run(main())


def test_requests_sharing_chunks_with_the_last_prefill_go_first():
    reqs = [request("r0", "a"), request("r1", "b"), request("r2", "ab"), request("r3", "b"), request("r4", "a")]
    # r0 (a) first; then the most overlap with the previous pick, ties to the oldest.
    assert run_order(reqs, max_skips=8) == ["r0", "r2", "r1", "r3", "r4"]


def test_skipping_is_bounded():
    reqs = [request("r0", "a"), request("r1", "b"), request("r2", "a"), request("r3", "a"), request("r4", "a")]
    assert run_order(reqs, max_skips=8) == ["r0", "r2", "r3", "r4", "r1"]
    assert run_order(reqs, max_skips=1) == ["r0", "r2", "r1", "r3", "r4"]


def test_queue_bound_abort_and_jobs():
    async def main() -> None:
        metrics = Metrics("m")
        fake = FakeEngine()
        engine = AsyncEngine(fake, metrics, max_queue=2)
        engine.start()
        assert await engine.run_job(lambda: threading.current_thread().name) == "engine"
        release = await hold_engine_thread(engine)
        first, second = engine.submit(request("r0", max_tokens=3)), engine.submit(request("r1"))
        with pytest.raises(QueueFull):
            engine.submit(request("r2"))
        assert sample(metrics, "rejected") == 1
        second.close()  # aborted while waiting: it never reaches the engine
        assert engine.num_waiting == 1 and sample(metrics, "aborted") == 1
        release.set()
        outputs = await drain(first)
        assert [o.finished for o in outputs] == [False, False, True] and outputs[-1].finish_reason == "length"
        assert fake.prefilled == ["r0"] and sample(metrics, "ok") == 1
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    async def main() -> None:
        metrics = Metrics("m")
        fake = FakeEngine()
        engine = AsyncEngine(fake, metrics, max_queue=4)
        engine.start()
        release = await hold_engine_thread(engine)
        fake.fail_next_step = True
        stream = engine.submit(request("r0", max_tokens=2))
        release.set()
        outputs = await drain(stream)
        assert outputs[-1].finish_reason == "error" and sample(metrics, "error") == 1
        outputs = await drain(engine.submit(request("r1", max_tokens=2)))
        assert outputs[-1].finish_reason == "length"
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_shutdown_aborts_what_does_not_finish_in_time():
    async def main() -> None:
        fake = FakeEngine()
        engine = AsyncEngine(fake, Metrics("m"), max_queue=4)
        engine.start()
        stream = engine.submit(request("r0", max_tokens=10**9))
        await stream.__anext__()
        await engine.shutdown(0.2)
        assert fake.num_running == 0
        with pytest.raises(QueueFull):
            engine.submit(request("r1"))

    asyncio.run(main())


@pytest.mark.parametrize("loc,path", [
    (("body", "messages", 0, "content"), "messages[0].content"),
    (("body", "cacheblend", "mode"), "cacheblend.mode"),
    (("query", "limit"), "limit"),
    (("body",), None),
])
def test_field_path(loc, path):
    assert field_path(loc) == path
