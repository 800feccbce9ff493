"""How this project configures vLLM: the connector, the worker extension, the CPU environment,
and the engine arguments the server's settings map to (`cacheblend serve --backend vllm`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config.settings import Settings

CONNECTOR = {"kv_connector": "CacheBlendConnector", "kv_connector_module_path": "engine.vllm_connector", "kv_role": "kv_both"}
WORKER_EXTENSION = "engine.vllm_worker.CacheBlendWorker"

# Settings that configure the server process only: the connector in vLLM's worker never reads them.
_SERVER_ONLY = {"backend", "vllm_engine_args", "host", "port", "api_key", "api_keys_file", "api_docs", "log_format",
                "log_level", "served_model_name"}


def vllm_env(kv_cache_gib: int = 1) -> dict[str, str]:
    """vLLM's CPU thread and KV settings for this machine (every core, none reserved)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def vllm_dtype(settings: Settings) -> str:
    """vLLM's `dtype` argument for our `dtype` setting, resolved on the device as the native engine does."""
    from engine.device import resolve_device, resolve_dtype
    return str(resolve_dtype(settings.dtype, resolve_device(settings.device))).removeprefix("torch.")


def connector_settings(settings: Settings) -> dict[str, Any]:
    """The settings the connector gets through `kv_connector_extra_config` (JSON values)."""
    return settings.model_dump(mode="json", exclude=_SERVER_ONLY, exclude_defaults=True)


def engine_args(settings: Settings, model_dir: Path, dtype: str) -> dict[str, Any]:
    """vLLM engine arguments for the server's settings: the same context length, batch, step
    budget (vLLM's chunked prefill and the blend share `max_num_batched_tokens`), seed and dtype,
    vLLM's prefix caching for exact prefixes, the connector with these settings, and the worker
    extension the server reaches the chunk store through; `vllm_engine_args` override any of them."""
    return {"model": str(model_dir), "dtype": dtype, "seed": settings.seed, "max_model_len": settings.max_model_len,
            "max_num_seqs": settings.max_num_seqs, "max_num_batched_tokens": settings.max_num_batched_tokens,
            "enable_prefix_caching": True, "worker_extension_cls": WORKER_EXTENSION,
            "kv_transfer_config": {**CONNECTOR, "kv_connector_extra_config": connector_settings(settings)},
            **settings.vllm_engine_args}
