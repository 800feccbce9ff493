"""`cacheblend bench gpu`: TTFT of full_prefill vs cacheblend at 4k-32k tokens on a lent NVIDIA GPU.

Needs nothing from the internet: the model is random weights with Mistral-7B's shape (32 layers,
hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocab 32000) in bfloat16, built directly on
the GPU (a MistralConfig and a random state dict, never an HF model on the CPU) and run through
our own `engine.model.Transformer` and `LLMEngine.prefill`. Random weights give meaningless text
but the same arithmetic, so timings are those of the real shape.

The prompt is a 32-token prefix, `context // chunk_tokens` chunks of `--chunk-tokens` random
tokens, and a 32-token suffix. Chunk KV is precomputed once (not timed) and kept in two tiers:
  device: in GPU memory;
  cpu:    in pinned host memory, copied to the GPU layer by layer by the engine during prefill.
Per context the modes are: full_prefill; cacheblend (r=`--ratio`, check layer `--check-layer`)
from each tier. TTFT = prefill + first token (argmax, copied to the host), timed with CUDA
events after `--warmup` untimed runs, median of `--repeat` runs (interleaved). The prefix cache is
cleared before every run, so nothing but chunk KV is reused.

Writes a markdown table and JSON (`--out`, default gpu_ttft.md / gpu_ttft.json). Designed to take
well under 6 minutes on an H200 (`--budget-s` stops starting new context sizes past a deadline).
`--dry-run`: a 2-layer tiny model on the CPU at contexts 64,128 (what the test runs).
`--vllm`: the vLLM backend instead, against vLLM alone and the native engine (bench/gpu_vllm.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from bench.gpu_checks import attention_check, ratio_one_check
from bench.gpu_model import MISTRAL_7B, TINY, StubTokenizer, Timer, build_model, tier_store

FIXED_TOKENS = 32  # prefix and suffix length each


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="TTFT full_prefill vs cacheblend, Mistral-7B shape, random weights, 4k-32k (GPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=None, help="comma list of context sizes in chunk tokens (default 4096,8192,16384,32768; dry run 64,128)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default 512; dry run 16)")
    p.add_argument("--ratio", type=float, default=0.15, help="cacheblend recompute ratio (default: %(default)s)")
    p.add_argument("--check-layer", type=int, default=None,
                   help="cacheblend check layer (default 1; dry run 0, so its 2-layer model recomputes selectively)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per mode and context (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per mode and context (default: %(default)s)")
    p.add_argument("--tiers", default="device,cpu", help="chunk KV tiers to measure (default: %(default)s)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default bfloat16 (dry run float32)")
    p.add_argument("--device", default=None, help="default cuda (dry run cpu)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no new context size after this many seconds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("gpu_ttft.md"), help="markdown table; JSON goes next to it (.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny 2-layer model on the CPU, contexts 64,128 (for tests)")
    p.add_argument("--vllm", action="store_true",
                   help="instead: the vLLM backend against vLLM alone and the native engine (bench/gpu_vllm.py; "
                        "needs vLLM: pip install -e .[vllm-cuda]); JSON next to --out (.vllm.json)")
    p.set_defaults(func=run)


@dataclass
class Case:
    label: str
    mode: str
    tier: Optional[str]  # chunk KV tier for cacheblend


def first_token(engine, segments, blend, device: torch.device) -> tuple[int, object]:
    from engine.segments import token_ids

    pre = engine.prefill(segments, blend, len(token_ids(segments)) + 1)
    return int(pre.result.logits.argmax().item()), pre


def run(args: argparse.Namespace) -> int:
    if args.vllm:
        from bench.gpu_vllm import run_vllm
        return run_vllm(args)
    from config.settings import Settings
    from engine.llm_engine import LLMEngine
    from engine.request import BlendParams
    from engine.segments import Segment

    t_start = time.perf_counter()
    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if dry else "bfloat16"))
    shape = TINY if dry else MISTRAL_7B
    contexts = [int(c) for c in (args.contexts or ("64,128" if dry else "4096,8192,16384,32768")).split(",") if c.strip()]
    chunk_tokens = args.chunk_tokens or (16 if dry else 512)
    tiers = [t for t in args.tiers.split(",") if t.strip()]
    for t in tiers:
        if t not in ("device", "cpu"):
            raise SystemExit(f"unknown tier {t!r}: device, cpu")
    check_layer = args.check_layer if args.check_layer is not None else (0 if dry else 1)
    if not 0 <= check_layer < shape["num_hidden_layers"]:
        raise SystemExit(f"--check-layer must be in [0, {shape['num_hidden_layers']})")
    torch.manual_seed(args.seed)
    max_ctx = max(contexts)
    num_chunks = max(1, max_ctx // chunk_tokens)
    max_positions = max_ctx + 2 * FIXED_TOKENS + 64

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, max_positions, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    settings = Settings(device=device.type, dtype=args.dtype or ("float32" if dry else "bfloat16"), chunk_context="sink",
                        max_model_len=max_positions, recompute_ratio=args.ratio, check_layers=[check_layer],
                        prefix_cache_bytes=1 << 30)
    stores = {t: tier_store(t, device, settings.dtype) for t in tiers}
    engine = LLMEngine(settings, store=stores[tiers[0]] if tiers else tier_store("cpu", device, settings.dtype),
                       model=model, tokenizer=StubTokenizer())

    g = torch.Generator().manual_seed(args.seed)
    vocab = shape["vocab_size"]

    def rand_ids(n: int) -> tuple[int, ...]:
        return tuple(int(x) for x in torch.randint(3, vocab, (n,), generator=g))

    prefix = Segment("prefix", (1,) + rand_ids(FIXED_TOKENS - 1))
    suffix = Segment("suffix", rand_ids(FIXED_TOKENS))
    chunks = [engine.chunk_segment(rand_ids(chunk_tokens)) for _ in range(num_chunks)]

    # chunk KV: precomputed once (not timed), then kept in each tier
    t0 = time.perf_counter()
    for seg in chunks:
        kv = engine.prefiller.compute_chunk_kv(seg)
        for store in stores.values():
            store.put(seg.chunk_key, kv)
        del kv
    if device.type == "cuda":
        torch.cuda.synchronize()
    precompute_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first = [prefix] + chunks[:max(1, contexts[0] // chunk_tokens)] + [suffix]
    checks = {"attention": attention_check(shape, device, dtype, n_keys=128 if dry else 4096,
                                           timed_keys=192 if dry else max_ctx, ratio=args.ratio),
              "ratio_one": ratio_one_check(engine, first, check_layer)}
    checks["seconds"] = time.perf_counter() - t0
    print(f"checks: {json.dumps(checks)}", flush=True)

    cases = [Case("full_prefill", "full_prefill", None)] + [Case(f"cacheblend[{t}]", "cacheblend", t) for t in tiers]
    blend = {"full_prefill": BlendParams(mode="full_prefill"),
             "cacheblend": BlendParams(mode="cacheblend", recompute_ratio=args.ratio, check_layers=[check_layer])}
    rows, skipped = [], []
    for ctx in contexts:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(ctx)
            continue
        k = max(1, ctx // chunk_tokens)
        segments = [prefix] + chunks[:k] + [suffix]
        n_tokens = sum(len(s) for s in segments)
        samples: dict[str, list[float]] = {c.label: [] for c in cases}
        walls: dict[str, list[float]] = {c.label: [] for c in cases}
        recomputed: dict[str, int] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for it in range(args.warmup + args.repeat):
            order = cases[it % len(cases):] + cases[:it % len(cases)]
            for case in order:
                if case.tier is not None:
                    engine.store = stores[case.tier]
                engine.prefix_cache.clear()
                with Timer(device) as tm:
                    _, pre = first_token(engine, segments, blend[case.mode], device)
                recomputed[case.label] = pre.result.stats.recomputed_tokens
                del pre
                if it >= args.warmup:
                    samples[case.label].append(tm.ms)
                    walls[case.label].append(tm.wall_ms)
        engine.prefix_cache.clear()
        full = statistics.median(samples["full_prefill"])
        row = {"context_tokens": n_tokens, "chunks": k, "chunk_tokens": chunk_tokens,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        for case in cases:
            xs = samples[case.label]
            med = statistics.median(xs)
            row[case.label] = {"ttft_median_ms": med, "ttft_min_ms": min(xs), "ttft_max_ms": max(xs), "ttft_all_ms": xs,
                               "wall_median_ms": statistics.median(walls[case.label]),
                               "speedup_vs_full_prefill": full / med, "tokens_recomputed": recomputed[case.label]}
        rows.append(row)
        print(_row_line(row, cases), flush=True)

    for store in stores.values():
        store.close()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
            "shape": shape, "dry_run": dry, "ratio": args.ratio, "check_layer": check_layer,
            "repeat": args.repeat, "warmup": args.warmup, "tiers": tiers, "model_build_s": build_s,
            "chunk_precompute_s": precompute_s, "total_s": time.perf_counter() - t_start,
            "skipped_contexts": skipped, "checks": checks, "timer": "cuda events" if device.type == "cuda" else "perf_counter"}
    md = to_markdown(rows, cases, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(md)
    print(f"wrote {args.out} and {json_path}")
    return 0


def _row_line(row: dict, cases: list[Case]) -> str:
    parts = [f"{row['context_tokens']:>6} tokens"]
    for c in cases:
        r = row[c.label]
        parts.append(f"{c.label} {r['ttft_median_ms']:.1f} ms ({r['speedup_vs_full_prefill']:.2f}x)")
    return " | ".join(parts)


def to_markdown(rows: list[dict], cases: list[Case], info: dict) -> str:
    head = ["context tokens"] + [f"{c.label} TTFT ms" for c in cases] + [f"{c.label} speedup" for c in cases if c.mode != "full_prefill"] + ["recomputed (cacheblend)"]
    model = "tiny 2-layer model (dry run)" if info["dry_run"] else "Mistral-7B shape (random weights)"
    lines = [f"# TTFT, {model}, {info['dtype']}, {info['device']}", "",
             f"cacheblend r={info['ratio']}, check layer {info['check_layer']}; median of {info['repeat']} runs after "
             f"{info['warmup']} warm-up runs ({info['timer']}); chunk KV precomputed (not timed); prefix cache cleared before each run.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["context_tokens"])] + [f"{row[c.label]['ttft_median_ms']:.1f}" for c in cases]
        cells += [f"{row[c.label]['speedup_vs_full_prefill']:.2f}x" for c in cases if c.mode != "full_prefill"]
        cb = next((c for c in cases if c.mode == "cacheblend"), None)
        cells.append(str(row[cb.label]["tokens_recomputed"]) if cb else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"model build {info['model_build_s']:.1f} s, chunk precompute {info['chunk_precompute_s']:.1f} s, "
                  f"total {info['total_s']:.1f} s; torch {info['torch']}, CUDA {info['cuda']}"]
    if info["skipped_contexts"]:
        lines.append(f"skipped (time budget): {info['skipped_contexts']}")
    a, one = info["checks"]["attention"], info["checks"]["ratio_one"]
    lines += ["", f"Checks: selected-query attention ({a['queries']} queries over {a['keys']} keys, {a['dtype']}) max abs "
                  f"error {a['max_abs_error_vs_float64']:.2e} vs float64; fused SDPA kernel: {a['fused_kernel']}; at "
                  f"{a['timed_keys']} keys {a['default_ms']:.2f} ms vs {a['math_path_ms']:.2f} ms on the unfused math path. "
                  f"Ratio 1.0 vs full prefill: same first token {one['first_token_equal']}, max abs logit diff "
                  f"{one['max_abs_logit_diff']:.2e} (logits up to {one['logit_scale']:.2f})."]
    return "\n".join(lines) + "\n"
