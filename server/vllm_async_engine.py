"""VllmAsyncEngine: resolved requests into vLLM's `AsyncLLM`, this project's outputs and stats out.

The same surface as `server/async_engine.py` (submit, streams, jobs, abort, shutdown), so the
serving classes and the metrics do not know which engine runs. A request's chunks go to the
CacheBlend connector as token spans in `kv_transfer_params`; the connector's record of the
blend comes back on the final output and fills the request's stats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from engine.request import Request, RequestOutput
from engine.resolve import BLEND_MODES
from engine.scheduler import QueueFull
from engine.segments import spans
from engine.stats import RequestStats
from engine.vllm_connector import PARAMS_KEY
from server.async_engine import RequestStream
from server.metrics import Metrics
from server.vllm_engine import VllmEngine

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_CLOSE_TIMEOUT_S = 60.0  # a flush to a slow tier (Redis, S3) at shutdown


def blend_params(request: Request) -> Optional[dict]:
    """`kv_transfer_params["cacheblend"]` for a request: its chunks' token spans, their salts
    where one differs from the request's (a shared chunk's, or the tenant's under a cache_salt),
    and its resolved blend (None: vLLM serves it alone, its prefix cache included). A chunk that
    ends the prompt is left to vLLM: the last prompt token must be computed there."""
    if request.mode not in BLEND_MODES:
        return None
    n = request.num_prompt_tokens
    chunks = [(seg, [s, e]) for seg, (s, e) in zip(request.segments, spans(list(request.segments)))
              if seg.kind == "chunk" and e < n]
    if not chunks:
        return None
    params: dict[str, Any] = {"chunks": [span for _, span in chunks], "mode": request.mode}
    if any(seg.salt != request.salt for seg, _ in chunks):
        params["salts"] = [seg.salt for seg, _ in chunks]
    if request.mode == "cacheblend":
        spec = request.spec
        params.update(check_layers=list(spec.check_layers), check_ratios=list(spec.ratios), selection_signal=spec.signal)
    return params


def vllm_inputs(request: Request, default_seed: int):
    """(prompt, SamplingParams) for vLLM: the token IDs, the salt (it isolates vLLM's prefix
    cache as ours), the sampling (unseeded requests get the server's seed, as natively)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = request.sampling
    prompt: dict[str, Any] = {"prompt_token_ids": list(request.token_ids)}
    if request.salt:
        prompt["cache_salt"] = request.salt
    blend = blend_params(request)
    params = SamplingParams(
        n=1, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0),
        seed=s.seed if s.seed is not None else default_seed, stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None, ignore_eos=s.ignore_eos, output_kind=RequestOutputKind.DELTA,
        skip_reading_prefix_cache=True if request.mode == "full_prefill" else None,
        extra_args={"kv_transfer_params": {PARAMS_KEY: blend}} if blend else None)
    return prompt, params


def finish_stats(st: RequestStats, request: Request, num_cached_tokens: int, kv_transfer_params: Optional[dict]) -> None:
    """Tokens by source: the connector's record of the blend (the question after the last
    chunk is computed by vLLM), else vLLM's own prefix-cache hit."""
    record = (kv_transfer_params or {}).get(PARAMS_KEY)
    if record is not None:
        for name, value in record.items():
            setattr(st, name, value)
        blended = st.tokens_reused + st.tokens_recomputed
        st.tokens_recomputed += request.num_prompt_tokens - blended
    else:
        st.exact_tokens = st.tokens_reused = num_cached_tokens
        st.tokens_recomputed = request.num_prompt_tokens - num_cached_tokens


class VllmAsyncEngine:
    """Requests on vLLM's engine, with the AsyncEngine surface the server uses."""

    def __init__(self, engine: VllmEngine, metrics: Metrics, loop: asyncio.AbstractEventLoop, counts: QueueCounts):
        self.engine = engine
        self.llm = engine.llm
        self.metrics = metrics
        self.loop = loop
        self.counts = counts
        self.accepting = True
        self._streams: dict[str, RequestStream] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        # jobs (chunk precompute, deletes) run in order, one at a time, as on the native engine thread
        self._jobs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chunk-jobs")

    def start(self) -> None:
        return  # vLLM's engine runs in its own processes

    @property
    def alive(self) -> bool:
        return not self.llm.errored

    # vLLM reports its queue only when it steps: the requests in flight here bound it (an idle
    # engine reports nothing more after its last request ended)
    @property
    def num_waiting(self) -> int:
        return min(self.counts.num_waiting, len(self._tasks))

    @property
    def num_running(self) -> int:
        return len(self._tasks) - self.num_waiting

    def submit(self, request: Request) -> RequestStream:
        settings = self.engine.settings
        if not self.accepting or len(self._streams) >= settings.max_num_seqs + settings.max_queue:
            self.metrics.observe_request(RequestStats(status="rejected"))
            self.metrics.observe_tenant(request.tenant, "rejected")
            raise QueueFull()
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop(), request.tenant)
        self._streams[request.request_id] = stream
        self._tasks[request.request_id] = asyncio.create_task(self._run(request, stream))
        return stream

    async def run_job(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.post_job(fn))

    def post_job(self, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        return self._jobs.submit(fn)

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            self.loop.call_soon_threadsafe(task.cancel)  # vLLM aborts a request whose generator is cancelled

    async def shutdown(self, timeout_s: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout_s`, abort the rest,
        close the chunk store (flushed) and stop vLLM's engine."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._tasks):
            self.abort(request_id)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.to_thread(self._jobs.shutdown, wait=True, cancel_futures=True)
        # flush the chunk store's pending writes while vLLM's worker still runs (vLLM stops it by
        # signal); an engine that died cannot answer, and its worker closed the store on its way out
        try:
            await asyncio.wait_for(self.llm.collective_rpc("cacheblend", args=("close",)), STORE_CLOSE_TIMEOUT_S)
        except Exception as e:
            log.warning("could not close the chunk store in vLLM's worker: %s", e or type(e).__name__)
        self.llm.shutdown()

    # --- one request --------------------------------------------------------------------------

    async def _run(self, request: Request, stream: RequestStream) -> None:
        st = RequestStats(prompt_tokens=request.num_prompt_tokens, mode=request.mode,
                          ratio=request.spec.ratio)
        last: Optional[float] = None
        out = RequestOutput(request.request_id, "", [], finished=True, finish_reason="abort")
        try:
            prompt, params = vllm_inputs(request, self.engine.settings.seed)
            (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt])  # vLLM's own prompt checks
            async for res in self.llm.generate(engine_input, params, request.request_id):
                c = res.outputs[0]
                now = time.perf_counter()
                if c.token_ids:
                    if last is None:
                        st.ttft_s = now - request.arrival_time
                    else:
                        st.itl_s.append(now - last)
                    last = now
                    st.completion_tokens += len(c.token_ids)
                out = RequestOutput(request.request_id, c.text, list(c.token_ids), res.finished,
                                    c.finish_reason if res.finished else None)
                if res.finished:  # the last output: sent below, with the stats
                    finish_stats(st, request, res.num_cached_tokens or 0, res.kv_transfer_params)
                    if res.metrics is not None and res.metrics.scheduled_ts:  # vLLM's engine-core clock
                        st.queue_s = max(0.0, res.metrics.scheduled_ts - res.metrics.queued_ts)
                else:
                    self._put(stream, out)
        except asyncio.CancelledError:
            out = RequestOutput(request.request_id, "", [], finished=True, finish_reason="abort")
        except Exception as e:  # vLLM refused or failed it: only this request ends
            log.exception("vLLM failed request %s", request.request_id)
            out = RequestOutput(request.request_id, "", [], finished=True, finish_reason="error", error=str(e))
        finally:
            self._streams.pop(request.request_id, None)
            self._tasks.pop(request.request_id, None)
        if not out.finished:
            out = RequestOutput(request.request_id, "", [], finished=True, finish_reason="error",
                                error="vLLM ended the request without a final output")
        now = time.perf_counter()
        st.finish_reason = out.finish_reason
        st.status = {"abort": "aborted", "error": "error"}.get(out.finish_reason, "ok")
        st.e2e_s = now - request.arrival_time
        st.decode_s = now - (request.arrival_time + st.ttft_s) if st.ttft_s is not None else None
        out.stats = st
        self.metrics.observe_request(st)
        self.metrics.observe_tenant(request.tenant, st.status)
        self._put(stream, out)

    def _put(self, stream: RequestStream, out: RequestOutput) -> None:
        stream.queue.put_nowait(out)  # on the event loop: the streams' own thread


@dataclass
class QueueCounts:
    """vLLM's scheduler's waiting requests, as its stat loggers last saw them."""
    num_waiting: int = 0


def queue_stat_logger(counts: QueueCounts) -> Callable[..., Any]:
    """A stat-logger factory for `AsyncLLM` that keeps `counts` up to date."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class QueueLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                counts.num_waiting = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self):
            pass

    return QueueLogger
