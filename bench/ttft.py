"""`cacheblend bench ttft`: TTFT of all four modes side by side, in one process.

A prompt of `--context-tokens` is built from one MuSiQue record: the instruction prefix,
`--chunks` passages (each cut to an equal share of the budget) and the question. Chunk KV is
precomputed first (not timed, as in serving after warm-up). Each repeat runs every mode once,
interleaved, so machine noise hits all modes alike. The prefix is prefix-cached for the reuse
modes (a deployment sees the same instruction on every request); `full_prefill` reuses nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

from bench.dataset import PREFIX, Record, load, suffix_for
from config import MODES, add_settings_flags, load_settings
from engine.llm_engine import LLMEngine
from engine.request import BlendParams
from engine.sampling import SamplingParams
from engine.segments import Segment
from engine.stats import RequestStats

PHASES = ("queue_s", "kv_fetch_s", "selection_s", "recompute_s", "first_decode_s")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ttft", help="TTFT of full_prefill / prefix_cache / full_reuse / cacheblend side by side")
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--record", type=int, default=0, help="which dataset record supplies passages and question")
    p.add_argument("--context-tokens", default="4096", help="comma list of prompt lengths")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    add_settings_flags(p, fields=["model", "device", "dtype", "check_layers", "selection_signal", "chunk_context", "recompute_chunk_head", "data_dir"])
    p.set_defaults(func=run)


def build_prompt(engine: LLMEngine, record: Record, context_tokens: int, num_chunks: int) -> list[Segment]:
    """The dataset's layout (instruction as the chat preamble), passages cut to fill the budget."""
    question = [{"role": "user", "content": suffix_for(record.question)}]
    probe = engine.chat_segments(question, [engine.chunk_segment((0,))])
    per_chunk = (context_tokens - sum(len(s) for s in probe) + 1) // num_chunks
    if per_chunk < 8:
        raise SystemExit(f"--context-tokens {context_tokens} leaves too little room for {num_chunks} chunks")
    passages = [engine.chunk_from_text(p + "\n\n").token_ids for p in record.passages]
    chunks = []
    for i in range(num_chunks):
        ids, j = passages[i % len(passages)], i + 1
        while len(ids) < per_chunk:  # a short passage is continued by the next ones
            ids, j = ids + passages[j % len(passages)], j + 1
        chunks.append(engine.chunk_segment(ids[:per_chunk]))
    return engine.chat_segments(question, chunks)


def bench_engine(args: argparse.Namespace, **overrides) -> LLMEngine:
    """An engine with the dataset's instruction as the chat preamble."""
    return LLMEngine(load_settings(args, chat_preamble=PREFIX, **overrides))


def measure(engine: LLMEngine, segments: list[Segment], mode: str, ratio: Optional[float],
            max_tokens: int = 1) -> RequestStats:
    """One greedy request in `mode` (ratio None: the engine's default), the prefix warmed for
    the reuse modes; its stats (`ttft_s`, and `e2e_s` covering the `max_tokens` generated)."""
    engine.prefix_cache.clear()
    if mode != "full_prefill":
        engine.warm_prefix(segments)
    # ignore_eos: every mode generates all `max_tokens`, so their times compare like for like.
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    req = engine.make_request(f"bench-{mode}", segments, sampling,
                              BlendParams(mode=mode, recompute_ratio=ratio if mode == "cacheblend" else None))
    return engine.generate([req])[req.request_id]["stats"]


def run(args: argparse.Namespace) -> int:
    engine = bench_engine(args, kv_disk_bytes=0)  # chunk KV from the cpu tier
    record = load(args.dataset)[args.record]
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for context in [int(c) for c in args.context_tokens.split(",")]:
        segments = build_prompt(engine, record, context, args.chunks)
        n_tokens = sum(len(s) for s in segments)
        for seg in segments:
            if seg.kind == "chunk":
                engine.ensure_chunk(seg)
        measure(engine, segments, "cacheblend", args.ratio)  # warm-up: allocator, rope tables
        samples: dict[str, list[RequestStats]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                samples[mode].append(measure(engine, segments, mode, args.ratio))
        for mode in modes:
            s = samples[mode]
            row = {
                "mode": mode,
                "ratio": args.ratio if mode == "cacheblend" else None,
                "context_tokens": n_tokens,
                "chunks": args.chunks,
                "ttft_median_s": statistics.median(x.ttft_s for x in s),
                "ttft_all_s": [x.ttft_s for x in s],
                "tokens_recomputed": s[0].tokens_recomputed,
                "tokens_reused": s[0].tokens_reused,
            }
            row.update({p.removesuffix("_s") + "_median_s": statistics.median(getattr(x, p) for x in s) for p in PHASES})
            rows.append(row)
        full = next((r["ttft_median_s"] for r in rows if r["mode"] == "full_prefill" and r["context_tokens"] == n_tokens), None)
        for r in rows:
            if r["context_tokens"] == n_tokens and full:
                r["speedup_vs_full_prefill"] = full / r["ttft_median_s"]
    _print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print_table(rows: list[dict]) -> None:
    head = f"{'mode':<13} {'ratio':>5} {'tokens':>6} {'ttft_s':>8} {'speedup':>7} {'fetch':>7} {'select':>7} {'compute':>8} {'recomputed':>10}"
    print(head)
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['mode']:<13} {ratio:>5} {r['context_tokens']:>6} {r['ttft_median_s']:>8.3f} {r.get('speedup_vs_full_prefill', 0):>6.2f}x "
              f"{r['kv_fetch_median_s']:>7.3f} {r['selection_median_s']:>7.3f} {r['recompute_median_s']:>8.3f} {r['tokens_recomputed']:>10}")
