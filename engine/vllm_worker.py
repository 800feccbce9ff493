"""What the server asks of the connector's worker, through vLLM's `collective_rpc`.

vLLM mixes this class into its worker (`worker_extension_cls`, a public extension point); the
server (`server/vllm_engine.py`) calls `cacheblend(op, *args)`. The chunk KV store lives with
the blend in vLLM's worker, so registering, checking and deleting chunk KV happen there,
between engine steps.
"""

from __future__ import annotations

from typing import Any

from engine.segments import Segment
from engine.vllm_blend import VllmBlender


def _blender() -> VllmBlender:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    blender = getattr(get_kv_transfer_group(), "blender", None) if has_kv_transfer_group() else None
    if blender is None:
        raise RuntimeError("the CacheBlend connector is not loaded in this vLLM worker")
    return blender


class CacheBlendWorker:
    def cacheblend(self, op: str, *args: Any) -> Any:
        """One chunk-store operation:
        - "keying": what chunk keys are made of here: (model fingerprint, KV dtype, precompute tag);
        - "ensure", token_ids, key: the chunk's KV stored under `key` (the server made it from
          "keying"), precomputed on a miss;
        - "contains" / "delete", key: bool;
        - "stats": the tiers, one line each;
        - "close": flush the store's pending writes and close it (at the server's shutdown)."""
        blender = _blender()
        prefiller, store = blender.prefiller, blender.store
        if op == "keying":
            return blender.model.fingerprint, prefiller.kv_dtype, prefiller.precompute.tag
        if op == "ensure":
            prefiller.ensure_chunk(Segment("chunk", tuple(args[0]), args[1]))
            return None
        if op == "contains":
            return store.contains(args[0])
        if op == "delete":
            return store.delete(args[0])
        if op == "stats":
            return store.stats()
        if op == "close":
            return store.close()
        raise ValueError(f"unknown chunk-store operation {op!r}")
