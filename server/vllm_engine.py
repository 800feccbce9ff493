"""The server's engine with `--backend vllm`: this project's request path up to the resolved
request, then vLLM's V1 engine (`AsyncLLM`) with the CacheBlend KV connector.

request -> segments -> token IDs (the model's tokenizer, the native chunk keys) -> resolved
`Request` -> vLLM (token IDs, and the chunks' spans in `kv_transfer_params`; `server/
vllm_async_engine.py`) -> the connector blends in vLLM's worker -> vLLM decodes. The chunk KV
store lives with the blend in vLLM's worker: the server reaches it through `collective_rpc`
(`engine/vllm_worker.py`), so there is one copy of the model and one store.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from config.settings import Settings
from engine.device import resolve_device
from engine.loader import resolve_model_dir, served_name
from engine.model import ModelConfig
from engine.prompt import chat_segments, completion_segments
from engine.request import BlendParams, Request
from engine.resolve import resolve_request
from engine.sampling import SamplingParams
from engine.segments import Segment, tokenize
from engine.vllm_config import engine_args, vllm_dtype, vllm_env
from kvstore.keys import chunk_key

log = logging.getLogger(__name__)


class WorkerStore:
    """The chunk store in vLLM's worker, as the server uses a store. Blocking: call it from a
    thread, never from the event loop."""

    def __init__(self, engine: "VllmEngine"):
        self._engine = engine

    def contains(self, key: str) -> bool:
        return self._engine.call("contains", key)

    def delete(self, key: str) -> bool:
        return self._engine.call("delete", key)

    def stats(self) -> list[str]:
        return self._engine.call("stats")

    def close(self) -> None:
        """Nothing left to do: `VllmAsyncEngine.shutdown` closed it in the worker, before vLLM stopped."""


class VllmEngine:
    """What the serving classes ask of an engine, on vLLM: segments, chunk keys, request
    resolution and the chunk store; `server/vllm_async_engine.py` runs the requests."""

    quality = None  # quality re-runs need a second prefill path (native backend only)

    def __init__(self, settings: Settings, llm, loop: asyncio.AbstractEventLoop, model_dir: Path):
        from transformers import AutoTokenizer

        self.settings = settings
        self.llm = llm
        self._loop = loop
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model_name = served_name(settings, model_dir)
        self.cfg = ModelConfig.from_hf(llm.model_config.hf_config)
        self.max_model_len = llm.model_config.max_model_len
        self.device = resolve_device(settings.device)
        self.store = WorkerStore(self)
        # what chunk keys are made of in the worker (its model fingerprint, KV dtype, precompute tag)
        self._keying = tuple(self.call("keying"))

    @property
    def recompute_ratio(self) -> float:
        return self.settings.recompute_ratio

    def call(self, op: str, *args: Any) -> Any:
        """One chunk-store operation in vLLM's worker (`engine/vllm_worker.py`), between engine
        steps; blocking, from a thread other than the event loop's."""
        rpc = self.llm.collective_rpc("cacheblend", args=(op, *args))
        return asyncio.run_coroutine_threadsafe(rpc, self._loop).result()[0]

    # --- request -> segments -> resolved request (as `LLMEngine`) ----------------------------

    def chunk_segment(self, token_ids: Sequence[int], salt: str = "") -> Segment:
        ids = tuple(token_ids)
        fingerprint, kv_dtype, tag = self._keying
        return Segment("chunk", ids, chunk_key(ids, fingerprint, kv_dtype, tag, salt), salt)

    def chunk_from_text(self, text: str, salt: str = "") -> Segment:
        return self.chunk_segment(tokenize(self.tokenizer, text), salt)

    def chat_segments(self, messages: list[dict], chunks: list[Segment], salt: str = "") -> list[Segment]:
        # earlier turns stay one exact prefix: vLLM's prefix cache reuses a conversation's history
        return chat_segments(self.tokenizer, messages, chunks, self.settings.chat_preamble)

    def user_turn(self, messages: list[dict]) -> tuple[int, ...]:
        return ()

    def completion_segments(self, prompt: str, chunks: list[Segment]) -> list[Segment]:
        return completion_segments(self.tokenizer, prompt, chunks, self.settings.completion_prefix)

    def make_request(self, request_id: str, segments: Sequence[Segment], sampling: SamplingParams = SamplingParams(),
                     blend: BlendParams = BlendParams(), input_param: str = "messages", user_turn: tuple[int, ...] = (),
                     salt: str = "", tenant: str = "default") -> Request:
        return resolve_request(request_id, segments, sampling, blend, self.settings, self.cfg.num_layers,
                               self.recompute_ratio, self.max_model_len, input_param, user_turn, salt, tenant)

    def ensure_chunk(self, segment: Segment) -> None:
        """The chunk's KV stored in the worker's store, precomputed there on a miss."""
        self.call("ensure", list(segment.token_ids), segment.chunk_key)


def load_vllm(settings: Settings, loop: asyncio.AbstractEventLoop, stat_loggers: Optional[list] = None) -> VllmEngine:
    """Start vLLM's engine (its own processes) on the settings' model, with the connector; blocking."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    device = resolve_device(settings.device)
    if device.type == "cpu":
        for name, value in vllm_env().items():
            os.environ.setdefault(name, value)  # the operator's own VLLM_CPU_* win
    model_dir = resolve_model_dir(settings.model, settings.data_dir)
    args = engine_args(settings, model_dir, vllm_dtype(settings))
    log.info("starting vLLM's engine with the CacheBlend connector: %s",
             {k: v for k, v in args.items() if k != "kv_transfer_config"})
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args, disable_log_stats=True), stat_loggers=stat_loggers)
    return VllmEngine(settings, llm, loop, model_dir)
