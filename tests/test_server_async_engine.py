"""AsyncEngine, the thread bridge, over the real engine: jobs on the engine thread, the queue
bound, aborts, a failing step, shutdown. Also the error field paths."""

from __future__ import annotations

import asyncio
import threading

import pytest

import engine.llm_engine as llm_engine_module
from engine.llm_engine import LLMEngine
from engine.request import RequestOutput
from engine.sampling import SamplingParams
from server.async_engine import AsyncEngine, QueueFull
from server.errors import field_path
from server.metrics import Metrics


@pytest.fixture
def small_engine(engine, settings):
    """A fresh engine (its own scheduler and store) on the session's loaded model."""
    return LLMEngine(settings.model_copy(update={"max_queue": 2, "kv_disk_bytes": 0}), model=engine.model,
                     tokenizer=engine.tokenizer)


def request(eng: LLMEngine, request_id: str, max_tokens: int = 1):
    segments = eng.chat_segments([{"role": "user", "content": "Say hello."}], [])
    return eng.make_request(request_id, segments, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def sample(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value("cacheblend:requests_total", {"model_name": metrics.model_name, "status": status})


async def hold_engine_thread(engine: AsyncEngine) -> threading.Event:
    """Park the engine thread in a job until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(30)

    asyncio.ensure_future(engine.run_job(job))
    await asyncio.to_thread(started.wait, 30)
    return release


async def drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def test_queue_bound_abort_and_jobs(small_engine):
    async def main() -> None:
        metrics = Metrics("m")
        engine = AsyncEngine(small_engine, metrics)
        engine.start()
        assert await engine.run_job(lambda: threading.current_thread().name) == "engine"
        release = await hold_engine_thread(engine)
        first = engine.submit(request(small_engine, "r0", max_tokens=3))
        second = engine.submit(request(small_engine, "r1"))
        with pytest.raises(QueueFull):
            engine.submit(request(small_engine, "r2"))
        assert sample(metrics, "rejected") == 1
        second.close()  # aborted while waiting: dropped at the next step, never prefilled
        release.set()
        outputs = await drain(first)
        assert [o.finished for o in outputs] == [False, False, True] and outputs[-1].finish_reason == "length"
        assert outputs[-1].stats.completion_tokens == 3 and outputs[0].stats.ttft_s > 0
        await engine.shutdown(5.0)
        assert sample(metrics, "ok") == 1 and sample(metrics, "aborted") == 1

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(small_engine, monkeypatch):
    real_decode = llm_engine_module.decode_step
    calls = {"n": 0}

    def decode_failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("decode failed")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(llm_engine_module, "decode_step", decode_failing_once)

    async def main() -> None:
        metrics = Metrics("m")
        engine = AsyncEngine(small_engine, metrics)
        engine.start()
        outputs = await drain(engine.submit(request(small_engine, "r0", max_tokens=2)))
        assert outputs[-1].finish_reason == "error" and sample(metrics, "error") == 1
        assert small_engine.scheduler.num_running == 0
        outputs = await drain(engine.submit(request(small_engine, "r1", max_tokens=2)))
        assert outputs[-1].finish_reason == "length"
        await engine.shutdown(5.0)

    asyncio.run(main())


def test_shutdown_aborts_what_does_not_finish_in_time(small_engine):
    async def main() -> None:
        engine = AsyncEngine(small_engine, Metrics("m"))
        engine.start()
        stream = engine.submit(request(small_engine, "r0", max_tokens=small_engine.max_model_len // 2))
        await stream.__anext__()
        await engine.shutdown(0.2)
        assert small_engine.scheduler.num_running == 0
        with pytest.raises(QueueFull):
            engine.submit(request(small_engine, "r1"))

    asyncio.run(main())


@pytest.mark.parametrize("loc,path", [
    (("body", "messages", 0, "content"), "messages[0].content"),
    (("body", "cacheblend", "mode"), "cacheblend.mode"),
    (("query", "limit"), "limit"),
    (("body",), None),
])
def test_field_path(loc, path):
    assert field_path(loc) == path
