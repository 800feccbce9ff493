"""`cacheblend bench documents`: a long document's whole sliding-window sweep, CacheBlend vs
full prefill of every window, in one process.

The document is the distinct MuSiQue passages of the dev questions (0-49), at least `--chars`
characters, tokenized once and cut into `--chunk-tokens` pieces sharing `--overlap-tokens`, as
POST /v1/documents cuts it. Registration (the KV of every piece the windows use, precomputed)
is timed once. Then each window of `--window` pieces, `--stride` apart, gets the question in
both modes, interleaved window by window so machine noise hits both alike. A window's time is
its TTFT, plus decoding when `--max-tokens` > 1. As in `bench ttft`, the prompt's prefix is
prefix-cached for cacheblend (a server has it from earlier requests); full_prefill reuses nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.dataset import DEFAULT_DATASET, load, long_document, select_questions
from bench.ttft import measure
from config import add_settings_flags, load_settings
from engine.llm_engine import LLMEngine
from engine.segments import tokenize
from kvstore.documents import cover

MODES = ("cacheblend", "full_prefill")
QUESTION = "Which people, places and dates do these passages mention?"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("documents", help="sliding-window sweep of a long document: cacheblend vs full prefill")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--chars", type=int, default=100_000, help="document length in characters (at least)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="tokens per piece")
    p.add_argument("--overlap-tokens", type=int, default=32, help="tokens a piece shares with the previous one")
    p.add_argument("--window", type=int, default=8, help="pieces per window")
    p.add_argument("--stride", type=int, default=1, help="pieces between window starts (1: the whole sliding sweep)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--ratio", type=float, default=None, help="cacheblend recompute ratio (default: the setting's)")
    p.add_argument("--max-tokens", type=int, default=1, help="tokens generated per window (1: TTFT only)")
    p.add_argument("--limit-windows", type=int, default=None, help="only the first N windows (a quick run)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    add_settings_flags(p, fields=["model", "device", "dtype", "check_layers", "selection_signal",
                                  "chunk_context", "kv_storage_dtype", "data_dir"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.overlap_tokens < args.chunk_tokens:
        raise SystemExit("--overlap-tokens must be at least 0 and smaller than --chunk-tokens")
    engine = LLMEngine(load_settings(args, kv_disk_bytes=0))  # chunk KV from the cpu tier
    text = long_document(select_questions(load(args.dataset), 0, 49), args.chars)
    ids = tokenize(engine.tokenizer, text)
    step = args.chunk_tokens - args.overlap_tokens
    pieces = [engine.chunk_segment(ids[a:b]) for a, b in cover(len(ids), args.chunk_tokens, step)]
    if args.window > len(pieces):
        raise SystemExit(f"--window {args.window} is larger than the document ({len(pieces)} pieces)")
    windows = cover(len(pieces), args.window, args.stride)[:args.limit_windows]
    used = pieces[:windows[-1][1]]

    t0 = time.perf_counter()
    for piece in used:
        engine.ensure_chunk(piece)
    registration_s = time.perf_counter() - t0

    question = [{"role": "user", "content": args.question}]
    prompts = [engine.chat_segments(question, pieces[a:b]) for a, b in windows]
    measure(engine, prompts[0], "cacheblend", args.ratio, args.max_tokens)  # warm-up: allocator, rope tables
    rows = []
    for i, segments in enumerate(prompts):
        for mode in MODES:
            st = measure(engine, segments, mode, args.ratio, args.max_tokens)
            rows.append({"window": i, "mode": mode, "prompt_tokens": st.prompt_tokens, "ttft_s": st.ttft_s,
                         "total_s": st.e2e_s, "tokens_recomputed": st.tokens_recomputed})

    result = summarize(rows, registration_s)
    result.update(characters=len(text), tokens=len(ids), pieces=len(pieces), pieces_precomputed=len(used),
                  chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens, window=args.window,
                  stride=args.stride, windows=len(windows), max_tokens=args.max_tokens,
                  ratio=args.ratio if args.ratio is not None else engine.recompute_ratio, rows=rows)
    _print(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def summarize(rows: list[dict], registration_s: float) -> dict:
    """Totals per mode and the ratios the target is judged by (full prefill time / cacheblend's)."""
    totals = {mode: {key: sum(r[key] for r in rows if r["mode"] == mode) for key in ("ttft_s", "total_s")}
              for mode in MODES}
    cb, full = totals["cacheblend"]["total_s"], totals["full_prefill"]["total_s"]
    return {"registration_s": registration_s, "totals": totals, "speedup": full / cb,
            "speedup_with_registration": full / (cb + registration_s)}


def _print(r: dict) -> None:
    print(f"document: {r['characters']} characters, {r['tokens']} tokens, {r['pieces']} pieces of {r['chunk_tokens']} "
          f"(overlap {r['overlap_tokens']}); {r['windows']} windows of {r['window']} pieces, stride {r['stride']}; "
          f"ratio {r['ratio']:.2f}; {r['max_tokens']} token(s) per window")
    print(f"registration: {r['pieces_precomputed']} pieces precomputed in {r['registration_s']:.1f} s")
    print(f"{'mode':<13} {'sum ttft_s':>10} {'sum total_s':>11}")
    for mode, t in r["totals"].items():
        print(f"{mode:<13} {t['ttft_s']:>10.1f} {t['total_s']:>11.1f}")
    print(f"full prefill / cacheblend: {r['speedup']:.2f}x; counting cacheblend's registration: "
          f"{r['speedup_with_registration']:.2f}x")
