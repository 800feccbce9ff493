"""Everything the routes share once the model is loaded: settings, engine, registry, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from config.settings import Settings
from engine.llm_engine import LLMEngine
from engine.quality import QualitySample
from kvstore import ChunkRegistry, build_registry
from server.async_engine import AsyncEngine
from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    engine: LLMEngine
    registry: ChunkRegistry
    metrics: Metrics
    async_engine: AsyncEngine

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


def load_state(settings: Settings, engine: Optional[LLMEngine] = None) -> ServerState:
    """Load the engine (blocking; it builds the tiered KV store from `settings`) unless one is
    given, wire its metrics and start the engine thread."""
    if engine is None:
        engine = LLMEngine(settings)
    metrics = Metrics(engine.model_name)
    metrics.set_ratio(engine.recompute_ratio)
    _report_quality(metrics, engine)
    async_engine = AsyncEngine(engine, metrics)
    async_engine.start()
    log.info("serving %s (max_model_len %d) on %s", engine.model_name, engine.max_model_len, engine.device)
    _log_state_placement(settings)
    return ServerState(settings, engine, build_registry(settings), metrics, async_engine)


def _log_state_placement(settings: Settings) -> None:
    state = settings.resolved_state_dir
    log.info("state: chunk registry %s, document records %s, disk KV tier %s", state / "chunks", state / "documents",
             settings.resolved_kv_disk_path if settings.kv_disk_bytes > 0 else "off")
    if settings.kv_disk_path is not None and settings.state_dir is None:
        log.warning("kv_disk_path is set but state_dir is not: the chunk registry and document records stay in %s, "
                    "shared with every server that uses that data_dir; set state_dir to give this server its own", state)
