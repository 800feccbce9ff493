"""`cacheblend bench kv-tiers`: cacheblend TTFT with chunk KV served from each tier.

The same prompt (bench ttft's layout) runs with its chunks in the cpu tier, on disk (page
cache dropped before every run, so the bytes really come from the device), and in Redis,
side by side with full_prefill in one process. Also prints the bytes per token per layer of
each storage dtype and what fp8 storage does to quality (first-token KL against full prefill).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.dataset import load
from bench.ttft import bench_engine, build_prompt, measure
from config import add_settings_flags
from engine.llm_engine import LLMEngine
from engine.quality import first_token_kl
from engine.request import BlendParams
from kvstore import STORAGE_DTYPES, build_store, bytes_per_token_per_layer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv-tiers", help="cacheblend TTFT with chunk KV in cpu / disk / redis vs full_prefill")
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--record", type=int, default=0)
    p.add_argument("--context-tokens", type=int, default=4096)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiers", default="cpu,disk,redis")
    p.add_argument("--redis-url", default=None, help="an existing Redis (default: start redis-server on loopback)")
    p.add_argument("--quality-records", type=int, default=5, help="records for the fp8-vs-fp32 storage KL check")
    p.add_argument("--json", type=Path, default=None)
    add_settings_flags(p, fields=["model", "device", "dtype", "kv_storage_dtype", "data_dir"])
    p.set_defaults(func=run)


def _drop_page_cache(folder: Path) -> None:
    """Evict the disk tier's files from the page cache so reads hit the device."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _tier_settings(tier: str, disk: Path, redis_url: str | None) -> dict:
    """A store whose cpu tier starts empty and whose only copy of the chunks is in `tier`."""
    return {
        "kv_cpu_bytes": 4 << 30,
        "kv_disk_bytes": (32 << 30) if tier == "disk" else 0,
        "kv_disk_path": disk,
        "redis_url": redis_url if tier == "redis" else None,
    }


def fresh_store(engine: LLMEngine, tier: str, disk: Path, redis_url: str | None, chunks: dict):
    """A new store for one measured run: the chunks are in `tier` and nowhere above it."""
    settings = engine.settings.model_copy(update=_tier_settings(tier, disk, redis_url))
    if tier == "cpu":
        store = build_store(settings, engine.model.device)
        for key, kv in chunks.items():
            store.put(key, kv)
        return store
    seed = build_store(settings.model_copy(update={"kv_cpu_bytes": 0}), engine.model.device)
    for key, kv in chunks.items():
        if not seed.contains(key):
            seed.put(key, kv)
    seed.close()  # flushes the disk / Redis writes
    if tier == "disk":
        _drop_page_cache(disk)
    return build_store(settings, engine.model.device)


def fp8_quality(engine: LLMEngine, records, ratio: float, args) -> list[dict]:
    """First-token KL vs full prefill, cacheblend with chunk KV stored in each dtype."""
    rows = []
    for dtype in STORAGE_DTYPES:
        eng = LLMEngine(engine.settings.model_copy(update={"kv_storage_dtype": dtype, "kv_disk_bytes": 0}),
                        model=engine.model, tokenizer=engine.tokenizer)
        kls = []
        for record in records:
            segments = build_prompt(eng, record, args.context_tokens, args.chunks)
            eng.prefix_cache.clear()
            full = eng.prefill(segments, BlendParams(mode="full_prefill")).result.logits
            eng.prefix_cache.clear()
            blend = eng.prefill(segments, BlendParams(mode="cacheblend", recompute_ratio=ratio)).result.logits
            kls.append(first_token_kl(full, blend))
        eng.store.close()
        c = eng.model.cfg
        rows.append({"storage_dtype": dtype, "bytes_per_token_per_layer": bytes_per_token_per_layer(dtype, c.num_kv_heads, c.head_dim),
                     "kl_first_token_mean": statistics.mean(kls)})
    return rows


def run(args: argparse.Namespace) -> int:
    from bench.services import start_redis

    records = load(args.dataset)
    tiers = [t for t in args.tiers.split(",") if t]
    engine = bench_engine(args, kv_disk_bytes=0)
    segments = build_prompt(engine, records[args.record], args.context_tokens, args.chunks)
    chunks = {s.chunk_key: engine.prefiller.compute_chunk_kv(s) for s in segments if s.kind == "chunk"}
    n_tokens = sum(len(s) for s in segments)
    samples: dict[str, list[dict]] = {name: [] for name in ["full_prefill", *tiers]}
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if "redis" in tiers and redis_url is None:
            redis_url = stack.enter_context(start_redis()).url
        disk = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kv-tiers-")))
        for repeat in range(args.repeat + 1):  # the first round warms up and is not kept
            runs = [("full_prefill", None)] + [(t, fresh_store(engine, t, disk, redis_url, chunks)) for t in tiers]
            for name, store in runs:
                if store is None:
                    stats = measure(engine, segments, "full_prefill", args.ratio)
                else:
                    engine.store = store
                    stats = measure(engine, segments, "cacheblend", args.ratio)
                    store.close()
                if repeat:
                    samples[name].append(stats)
    full = statistics.median(s["ttft_s"] for s in samples["full_prefill"])
    rows = []
    for name, runs in samples.items():
        ttft = statistics.median(s["ttft_s"] for s in runs)
        rows.append({
            "tier": name if name != "full_prefill" else None,
            "mode": "full_prefill" if name == "full_prefill" else "cacheblend",
            "context_tokens": n_tokens,
            "ttft_median_s": ttft,
            "speedup_vs_full_prefill": full / ttft,
            "kv_load_median_s": statistics.median(s["kv_load_s"] for s in runs),
            "kv_wait_median_s": statistics.median(s["kv_wait_s"] for s in runs),
            "chunk_hits": runs[-1]["chunk_hits"],
            "loading_hidden_share": sum(s["loading_hidden"] for s in runs) / len(runs),
        })
    print(f"{'run':<14} {'ttft_s':>8} {'speedup':>8} {'load_s':>8} {'wait_s':>8} hits")
    for r in rows:
        print(f"{r['tier'] or 'full_prefill':<14} {r['ttft_median_s']:>8.3f} {r['speedup_vs_full_prefill']:>7.2f}x "
              f"{r['kv_load_median_s']:>8.3f} {r['kv_wait_median_s']:>8.3f} {r['chunk_hits']}")
    cpu = next((r["ttft_median_s"] for r in rows if r["tier"] == "cpu"), None)
    disk_row = next((r for r in rows if r["tier"] == "disk"), None)
    if cpu and disk_row:
        print(f"disk / cpu TTFT: {disk_row['ttft_median_s'] / cpu:.3f}")
    quality = fp8_quality(engine, records[: args.quality_records], args.ratio, args) if args.quality_records else []
    for q in quality:
        print(f"storage {q['storage_dtype']:<14} {q['bytes_per_token_per_layer']:>5} B/token/layer  KL(full||cacheblend) {q['kl_first_token_mean']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tiers": rows, "storage": quality}, indent=2))
    return 0
