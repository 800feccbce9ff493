"""`cacheblend bench stall`: how long a running stream waits for its next token while other
requests prefill, at several step budgets (`max_num_batched_tokens`, `max_itl_slowdown`), in
one process.

One greedy stream (a dev-split question with `--stream-passages` passages) decodes alone for
`--idle-tokens` tokens; then `--prefills` cacheblend requests arrive at once (the next dev
questions, `--passages` passages each, chunk KV stored beforehand) and are prefilled one after
the other while the stream goes on. Per budget pair: the stream's inter-token gap alone (p50) and
while the others prefill (p50, p99, max), and the others' TTFT (p50, max). A budget larger than
any prompt ("whole") with slowdown 0 is the old behaviour: a prefill runs to its end before
anyone decodes.
The engine runs on this thread (no server), so the numbers are the engine's own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.dataset import DEFAULT_DATASET, chunk_texts, load, messages_for
from bench.stats import percentile
from bench.ttft import bench_engine
from config import add_settings_flags
from engine.request import BlendParams
from engine.sampling import SamplingParams

WHOLE = 1 << 30  # a budget no prompt reaches


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stall", help="a running stream's inter-token gap while other requests prefill, per step budget")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--budgets", default=f"{WHOLE},8192,512", help="comma list of max_num_batched_tokens (default: whole, 8192, 512)")
    p.add_argument("--slowdowns", default="0,3", help="comma list of max_itl_slowdown, each run at every budget (default: 0, 3)")
    p.add_argument("--prefills", type=int, default=3, help="requests that arrive while the stream decodes")
    p.add_argument("--passages", type=int, default=10, help="passages (chunks) per arriving request")
    p.add_argument("--stream-passages", type=int, default=2)
    p.add_argument("--idle-tokens", type=int, default=8, help="stream tokens decoded alone first")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    add_settings_flags(p, fields=["model", "device", "dtype", "data_dir"])
    p.set_defaults(func=run)


def _request(engine, request_id: str, record, passages: int, max_tokens: int):
    chunks = [engine.chunk_from_text(t) for t in chunk_texts(record, passages)]
    for seg in chunks:
        engine.ensure_chunk(seg)  # stored beforehand, as after registration
    segments = engine.chat_segments(messages_for(record), chunks)
    return engine.make_request(request_id, segments, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                               BlendParams(mode="cacheblend"))


def measure(engine, stream, others, idle_tokens: int) -> dict:
    """Drive the engine step by step; token times of the stream, first-token times of the others."""
    engine.prefix_cache.clear()
    times: list[float] = []
    first: dict[str, float] = {}
    engine.add_request(stream)
    arrived = None
    while engine.has_work():
        if arrived is None and len(times) >= idle_tokens:
            arrived = time.perf_counter()
            for r in others:
                engine.add_request(r)
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == stream.request_id:
                times += [now] * len(out.token_ids)
            elif out.request_id not in first:
                first[out.request_id] = now
                if len(first) == len(others):
                    engine.abort(stream.request_id)  # measured: the stream has decoded through every prefill
    gaps = [b - a for a, b in zip(times, times[1:])]
    idle = gaps[:idle_tokens - 1]
    last_first = max(first.values())
    during = [g for t, g in zip(times[1:], gaps) if arrived < t <= last_first]
    ttft = [t - arrived for t in first.values()]
    return {"idle_gap_p50_s": percentile(idle, 50), "gap_p50_s": percentile(during, 50), "gap_p99_s": percentile(during, 99),
            "gap_max_s": max(during), "stream_tokens_during": len(during), "ttft_p50_s": percentile(ttft, 50),
            "ttft_max_s": max(ttft), "prefills_s": last_first - arrived}


def run(args: argparse.Namespace) -> int:
    engine = bench_engine(args, kv_disk_bytes=0)
    records = load(args.dataset)[: 1 + args.prefills]
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    slowdowns = [float(x) for x in args.slowdowns.split(",") if x.strip()]
    rows = []
    for slowdown in slowdowns:
        for budget in budgets:
            engine.settings = engine.settings.model_copy(update={"max_num_batched_tokens": budget, "max_itl_slowdown": slowdown})
            label = "whole" if budget >= WHOLE else budget
            name = f"{label}/{slowdown:g}"
            others = [_request(engine, f"r{i}-{name}", r, args.passages, 4) for i, r in enumerate(records[1:])]
            # as long as the context allows: it decodes through every prefill, then is aborted
            stream = _request(engine, f"stream-{name}", records[0], args.stream_passages, None)
            row = {"budget": label, "slowdown": slowdown, **measure(engine, stream, others, args.idle_tokens)}
            rows.append(row)
            print(f"budget {row['budget']:>6}, slowdown {slowdown:g}: stream gap alone {row['idle_gap_p50_s']:.3f} s; while "
                  f"{args.prefills} prefill: p50 {row['gap_p50_s']:.3f} p99 {row['gap_p99_s']:.3f} max {row['gap_max_s']:.3f} s "
                  f"(p99 {row['gap_p99_s'] / row['idle_gap_p50_s']:.1f}x alone); their TTFT p50 {row['ttft_p50_s']:.2f} "
                  f"max {row['ttft_max_s']:.2f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items() if k != "func"}, "rows": rows}, indent=2))
    return 0
