"""Chunk KV store: tiers, keys, serialization.

Entry points:
    build_store(settings, device) -> TieredStore    the tiered store from config.Settings
    build_registry(settings) -> ChunkRegistry       chunk ID -> text/tokens
    build_documents(settings) -> DocumentRecords    document ID -> its ordered chunk IDs
    chunk_key(token_ids, model_fingerprint, kv_dtype, convention, salt="") -> str
    LayerPrefetcher, ChunkMissing                   layer-by-layer loading under compute
    bytes_per_token_per_layer(storage_dtype, num_kv_heads, head_dim) -> int

`TieredStore(tiers, ...)` takes any ordered list of tier_base.Tier objects, fastest first.
`TieredStore.stats()` returns {tier name: counters}; from build_store the names, in order, are
"device", "cpu", "disk", "redis", "s3" (only those configured). Counters (names are stable; they
become Prometheus metrics):
    hits           reads served by this tier (a layer-range read counts once)
    misses         reads this tier could not serve (including corrupt blobs)
    bytes_read     bytes of stored tensors read on hits (whole blob for redis/s3)
    bytes_written  bytes written into the tier (puts, promotions, demotions)
    evictions      entries evicted to make room (local tiers)
    corrupt        blobs that failed header/shape/checksum checks and were deleted
    errors         failed operations (Redis/S3 unreachable or timing out, any failed write)
    load_seconds   wall time spent in reads that hit
    bytes_used     bytes held now (0 for redis/s3: not tracked)
    capacity       byte capacity (0 for redis/s3: not tracked)
    entries        entries held now (0 for redis/s3: not tracked)
The first eight are monotonic counters; the last three are gauges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvstore.base import ChunkKV, ChunkStore
from kvstore.documents import DocumentRecords
from kvstore.keys import chunk_key, check_key, is_key
from kvstore.prefetch import ChunkMissing, LayerPrefetcher
from kvstore.quant import STORAGE_DTYPES, bytes_per_token_per_layer
from kvstore.registry import ChunkRegistry
from kvstore.tier_base import Tier
from kvstore.tier_disk import DiskTier
from kvstore.tier_memory import MemoryTier
from kvstore.tiered import TieredStore

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = [
    "ChunkKV", "ChunkStore", "ChunkMissing", "ChunkRegistry", "DocumentRecords", "LayerPrefetcher", "TieredStore",
    "STORAGE_DTYPES", "build_documents", "build_registry", "build_store", "bytes_per_token_per_layer", "check_key",
    "chunk_key", "is_key",
]


def build_store(settings: "Settings", device: torch.device) -> TieredStore:
    """The tiered store `settings` describe, returning KV on `device`.

    device tier: CUDA `device` and kv_device_bytes > 0; cpu: kv_cpu_bytes > 0 (pinned with
    CUDA); disk: kv_disk_bytes > 0, at resolved_kv_disk_path; redis: redis_url set; s3:
    s3_bucket set (s3_endpoint optional, credentials from the environment).
    """
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    tiers: list[Tier] = []
    if cuda and settings.kv_device_bytes > 0:
        tiers.append(MemoryTier("device", settings.kv_device_bytes, device))
    if settings.kv_cpu_bytes > 0:
        tiers.append(MemoryTier("cpu", settings.kv_cpu_bytes, torch.device("cpu"), pin_memory=cuda))
    if settings.kv_disk_bytes > 0:
        tiers.append(DiskTier(settings.resolved_kv_disk_path, settings.kv_disk_bytes))
    # redis and boto3 take about a second to import: only when configured.
    if settings.redis_url:
        from kvstore.tier_redis import RedisTier

        tiers.append(RedisTier(settings.redis_url, settings.redis_ttl_s, settings.redis_max_bytes,
                               settings.redis_timeout_s))
    if settings.s3_bucket:
        from kvstore.tier_s3 import S3Tier

        tiers.append(S3Tier(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint))
    return TieredStore(tiers, settings.kv_storage_dtype, device, settings.kv_disk_write)


def build_registry(settings: "Settings") -> ChunkRegistry:
    """The chunk registry under `<state_dir>/chunks`, shared through Redis when configured."""
    return ChunkRegistry(settings.resolved_state_dir / "chunks", settings.redis_url, settings.redis_timeout_s)


def build_documents(settings: "Settings") -> DocumentRecords:
    """The document records under `<state_dir>/documents`, next to the chunk registry's."""
    return DocumentRecords(settings.resolved_state_dir / "documents")
