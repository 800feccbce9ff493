"""`cacheblend bench load`: concurrent RAG requests against the HTTP server, full_prefill vs cacheblend.

Workload: MuSiQue records in the reference layout (bench.dataset): each record's first
`--passages` passages, each plus "\\n\\n", are chunks registered beforehand through POST
/v1/chunks (warm-up, not timed); a request is one user turn holding the question suffix, with the
chunk IDs in `chunks`. The instruction prefix is the server's `chat_preamble`: a server started
here gets it; a server given with `--url` should run with `--chat-preamble` set to it.

Each mode runs as its own phase of `--requests` streamed requests, at most `--concurrency` in
flight, the mode chosen per request with the `cacheblend` override. TTFT is measured at the client
(request sent -> first content token); requests/s and output tokens/s over the phase's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

from bench.dataset import DEFAULT_DATASET, PREFIX, chunk_texts, load, messages_for
from bench.load_peer import SERVERS, stream_one
from bench.stats import percentile

MODES = ("full_prefill", "cacheblend")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="concurrent RAG requests over HTTP: TTFT p50/p95, requests/s, tokens/s per mode")
    p.add_argument("--url", default=None, help="a running server (default: start one with the settings below)")
    p.add_argument("--api-key", default=None, help="bearer key of the server at --url")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--requests", type=int, default=32, help="requests per mode")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: all of them)")
    p.add_argument("--records", type=int, default=8, help="distinct dataset records the requests cycle through")
    p.add_argument("--passages", type=int, default=10, help="passages (chunks) per request")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path, default=Path("out/bench_load.json"), help="write the results here")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="extra `cacheblend serve` flag for a server started here, e.g. --server-flag=--device=cuda")
    peer = p.add_argument_group("--peer vllm: the same workload on vLLM's own server and ours (bench/load_peer.py)")
    peer.add_argument("--peer", choices=["vllm"], default=None)
    peer.add_argument("--servers", type=lambda s: [x for x in s.split(",") if x], default=list(SERVERS),
                      help=f"servers to run, in order (default: {','.join(SERVERS)})")
    peer.add_argument("--concurrencies", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32])
    peer.add_argument("--min-requests", type=int, default=8, help="requests per phase at least (else: the concurrency)")
    peer.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                      help="vLLM (and our vLLM backend) compiled, vLLM's fastest CPU mode (--no-compile: eager)")
    p.set_defaults(func=run)


async def _register_chunks(client: httpx.AsyncClient, texts: list[str]) -> list[str]:
    response = await client.post("/v1/chunks", json={"texts": texts})
    response.raise_for_status()
    return [c["id"] for c in response.json()["data"]]


async def _one_request(client: httpx.AsyncClient, model: str, messages: list[dict], chunk_ids: list[str],
                       mode: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "chunks": chunk_ids, "cacheblend": {"mode": mode},
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    return {"mode": mode, **await stream_one(client, "/v1/chat/completions", body)}


async def _phase(client: httpx.AsyncClient, model: str, workload: list[tuple[list[dict], list[str]]], mode: str,
                 requests: int, concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> dict:
        messages, chunk_ids = workload[i % len(workload)]
        async with gate:
            return await _one_request(client, model, messages, chunk_ids, mode, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(requests)))
    return list(results), time.perf_counter() - start


def summarize(mode: str, results: list[dict], wall_s: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    server_ttft = [r["server"]["ttft_s"] for r in ok if r["server"] and r["server"].get("ttft_s") is not None]
    output_tokens = sum(r["completion_tokens"] for r in ok)
    recomputed = [r["server"]["tokens_recomputed"] for r in ok if r["server"]]
    return {
        "mode": mode,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "server_ttft_p50_s": percentile(server_ttft, 50),
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in ok) if ok else None,
        "tokens_recomputed_mean": statistics.mean(recomputed) if recomputed else None,
    }


async def run_load(base_url: str, args: argparse.Namespace, api_key: Optional[str] = None) -> dict:
    """Register the chunks, run one phase per mode, return the summaries and per-request rows."""
    records = load(args.dataset)[:args.records]
    modes = [m for m in args.modes.split(",") if m]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or args.requests)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits) as client:
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        workload = [(messages_for(r), await _register_chunks(client, chunk_texts(r, args.passages))) for r in records]
        summaries, rows = [], []
        for mode in modes:
            results, wall_s = await _phase(client, model, workload, mode, args.requests,
                                           args.concurrency or args.requests, args.max_tokens)
            summaries.append(summarize(mode, results, wall_s))
            rows += results
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
            "url": base_url, "model": model, "summary": summaries, "requests": rows}


def print_table(summaries: list[dict]) -> None:
    def f(x: Optional[float], digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    print(f"{'mode':<13} {'ok':>4} {'err':>4} {'ttft_p50':>9} {'ttft_p95':>9} {'srv_p50':>8} {'req/s':>7} {'out_tok/s':>9} {'prompt':>7} {'recomp':>7}")
    for s in summaries:
        print(f"{s['mode']:<13} {s['ok']:>4} {s['errors']:>4} {f(s['ttft_p50_s']):>9} {f(s['ttft_p95_s']):>9} "
              f"{f(s['server_ttft_p50_s']):>8} {f(s['requests_per_s'], 2):>7} {f(s['output_tokens_per_s'], 1):>9} "
              f"{f(s['prompt_tokens_mean'], 0):>7} {f(s['tokens_recomputed_mean'], 0):>7}")


def run(args: argparse.Namespace) -> int:
    if args.peer:
        from bench.load_peer import run_peer
        return run_peer(args)
    if args.url:
        report = asyncio.run(run_load(args.url.rstrip("/"), args, args.api_key))
    else:
        from server.launcher import serve_subprocess

        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            flags = ["--chat-preamble", PREFIX, "--max-queue", str(max(64, args.requests)),
                     "--kv-disk-path", str(Path(tmp, "kv")), *args.server_flag]
            with serve_subprocess(Path(tmp, "server.log"), flags) as base_url:
                report = asyncio.run(run_load(base_url, args))
    print_table(report["summary"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(s["errors"] == 0 for s in report["summary"]) else 1
