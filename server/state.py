"""Everything the routes share once the model is loaded: settings, engine, registry, metrics."""

from __future__ import annotations

import logging
import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from config.settings import Settings
from engine.llm_engine import LLMEngine
from engine.quality import QualitySample
from kvstore import ChunkRegistry, build_registry
from server.async_engine import AsyncEngine
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.vllm_async_engine import VllmAsyncEngine
    from server.vllm_engine import VllmEngine

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    engine: Union[LLMEngine, "VllmEngine"]             # the request path up to a resolved request, and the chunk store
    registry: ChunkRegistry
    metrics: Metrics
    async_engine: Union[AsyncEngine, "VllmAsyncEngine"]  # runs resolved requests

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def close(self) -> None:
        """Flush the chunk store and release the registry (after the engine thread stopped)."""
        self.engine.store.close()
        self.registry.close()


def _report_quality(metrics: Metrics, engine: LLMEngine) -> None:
    """Send the engine's quality samples and ratio-controller decisions (engine thread) to metrics."""

    def on_quality(sample: QualitySample) -> None:
        metrics.observe_quality(sample.kl, sample.top1_agree, sample.f1)

    def on_controller(decision: str, ratio: float) -> None:
        metrics.controller_decision(decision)
        metrics.set_ratio(ratio)

    engine.quality.on_quality.append(on_quality)
    engine.quality.on_controller.append(on_controller)


def load_state(settings: Settings, loop: asyncio.AbstractEventLoop, engine: Optional[LLMEngine] = None) -> ServerState:
    """Load the engine (blocking; `settings.backend` says which) unless one is given, wire its
    metrics and start it. The native engine builds the tiered KV store from `settings`; with
    vLLM, its worker does. `loop`: the server's event loop (vLLM's engine client runs on it)."""
    if settings.backend == "vllm" and engine is None:
        from server.vllm_async_engine import QueueCounts, VllmAsyncEngine, queue_stat_logger
        from server.vllm_engine import load_vllm

        counts = QueueCounts()
        engine = load_vllm(settings, loop, [queue_stat_logger(counts)])
        metrics = Metrics(engine.model_name)
        async_engine = VllmAsyncEngine(engine, metrics, loop, counts)
    else:
        if engine is None:
            engine = LLMEngine(settings)
        metrics = Metrics(engine.model_name)
        _report_quality(metrics, engine)
        async_engine = AsyncEngine(engine, metrics)
    metrics.set_ratio(engine.recompute_ratio)
    async_engine.start()
    log.info("serving %s (max_model_len %d) on %s, %s backend", engine.model_name, engine.max_model_len, engine.device,
             settings.backend)
    _log_state_placement(settings)
    return ServerState(settings, engine, build_registry(settings), metrics, async_engine)


def _log_state_placement(settings: Settings) -> None:
    state = settings.resolved_state_dir
    log.info("state: chunk registry %s, document records %s, disk KV tier %s", state / "chunks", state / "documents",
             settings.resolved_kv_disk_path if settings.kv_disk_bytes > 0 else "off")
    if settings.kv_disk_path is not None and settings.state_dir is None:
        log.warning("kv_disk_path is set but state_dir is not: the chunk registry and document records stay in %s, "
                    "shared with every server that uses that data_dir; set state_dir to give this server its own", state)
