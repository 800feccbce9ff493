"""Micro-benchmark: put cost and per-layer read latency of the chunk KV store, per tier and dtype.

    python -m bench.kvstore_layers [--layers 30 --kv-heads 3 --head-dim 64 --tokens 512]

Defaults match SmolLM2-135M. Disk reads here come from the page cache (a hot file), so
they show the format's overhead, not the device's speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kvstore import ChunkKV, TieredStore, bytes_per_token_per_layer, chunk_key
from kvstore.tier_disk import DiskTier
from kvstore.tier_memory import MemoryTier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    L, H, T, D = args.layers, args.kv_heads, args.tokens, args.head_dim
    kvs = [ChunkKV(torch.randn(L, H, T, D), torch.randn(L, H, T, D)) for _ in range(args.chunks)]
    keys = [chunk_key([i] * T, "bench", "float32", "sink") for i in range(args.chunks)]
    print(f"chunk: L={L} Hkv={H} T={T} D={D}, {args.chunks} chunks")
    print(f"{'storage':>14} {'B/tok/layer':>11} {'put ms':>8} {'cpu layer us':>12} {'disk layer us':>13}")
    for storage in ("float32", "float16", "bfloat16", "float8_e4m3fn"):
        with tempfile.TemporaryDirectory() as tmp:
            tiers = [MemoryTier("cpu", 1 << 34, torch.device("cpu")), DiskTier(Path(tmp), 1 << 34)]
            store = TieredStore(tiers, storage)
            t0 = time.perf_counter()
            for key, kv in zip(keys, kvs):
                store.put(key, kv)
            put_ms = (time.perf_counter() - t0) / len(keys) * 1e3  # the caller's cost: disk writes are background
            store.flush()
            timings = {}
            for tier in ("cpu", "disk"):
                t0 = time.perf_counter()
                for l in range(L):
                    for key in keys:
                        got = store.get(key, range(l, l + 1))
                        assert got is not None and got.tier == tier
                timings[tier] = (time.perf_counter() - t0) / (L * len(keys)) * 1e6
                for key in keys:  # next round reads from disk
                    store.tiers[0].remove(key)
            store.close()
        print(f"{storage:>14} {bytes_per_token_per_layer(storage, H, D):>11} {put_ms:>8.2f} "
              f"{timings['cpu']:>12.1f} {timings['disk']:>13.1f}")


if __name__ == "__main__":
    main()
