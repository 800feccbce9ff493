"""`cacheblend bench load --peer vllm`: one RAG workload against vLLM's own OpenAI server and
against ours (native backend, and vLLM backend), one server after the other, at each concurrency.

Workload: request i takes record i mod `--records`, its first `--passages` passages in a new
order (seeded by i) and its question; `--max-tokens` streamed tokens, greedy, EOS ignored so
every server writes as many. Every passage has been seen once before the timed phases: ours got
the passages registered as chunks; vLLM got each record once in its original order (its prefix
cache then holds what it can reuse: the instruction prefix). All get the same token IDs: vLLM
as a token-ID prompt to /v1/completions, ours as chunk IDs and the question to /v1/chat/completions.

Per server and concurrency: TTFT p50/p99 and inter-token gap p50/p99 at the client (from the
SSE events), requests/s and output tokens/s over the phase's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

from bench.dataset import PREFIX, Record, chunk_texts, load, messages_for
from bench.stats import percentile

SERVERS = ("vllm", "native", "vllm-backend")


def plan(records: list[Record], passages: int, phases: list[int], seed: int = 0) -> list[list[tuple[Record, list[int]]]]:
    """(record, passage order) per request of each phase: every request is a new order of its
    record's passages, never the original one (the warm-up's) nor one an earlier request used
    (a repeat would be an exact prefix-cache hit)."""
    rng, used, out = random.Random(seed), set(), []
    for n in phases:
        jobs = []
        for i in range(n):
            record = records[len(used) % len(records)]
            k = min(passages, len(record.passages))
            if len(used) >= len(records) * (math.factorial(k) - 1):
                raise ValueError(f"not enough new passage orders for {sum(phases)} requests: more --records or --passages")
            order = list(range(k))
            while order == sorted(order) or (record.index, tuple(order)) in used:
                rng.shuffle(order)
            used.add((record.index, tuple(order)))
            jobs.append((record, order))
        out.append(jobs)
    return out


async def stream_one(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One streamed request (chat or completion): TTFT, the gaps between token events, the
    usage, the server's last `cacheblend` object, errors."""
    start = time.perf_counter()
    result: dict = {"ok": False, "ttft_s": None, "e2e_s": None, "gaps_s": [], "completion_tokens": 0, "server": None}
    last = None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            result["error"] = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result["error"] = event["error"]["message"]
                return result
            if event.get("cacheblend"):
                result["server"] = event["cacheblend"]
            if event.get("usage"):
                result["completion_tokens"] = event["usage"]["completion_tokens"]
                result["prompt_tokens"] = event["usage"]["prompt_tokens"]
            choice = event["choices"][0] if event.get("choices") else {}
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                now = time.perf_counter()
                if last is None:
                    result["ttft_s"] = now - start
                else:
                    result["gaps_s"].append(now - last)
                last = now
    result["e2e_s"] = time.perf_counter() - start
    result["ok"] = True
    return result


class Target:
    """How one server is asked for a request of the workload."""

    def __init__(self, kind: str, client: httpx.AsyncClient, tokenizer, max_tokens: int):
        self.kind, self.client, self.tokenizer, self.max_tokens = kind, client, tokenizer, max_tokens
        self.model = ""
        self.chunk_ids: dict[str, str] = {}  # chunk text -> its ID on our server

    async def prepare(self, records: list[Record], passages: int) -> None:
        self.model = (await self.client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        for record in records:
            texts = chunk_texts(record, passages)
            if self.kind == "vllm":  # seen once, in its original order
                await stream_one(self.client, "/v1/completions", self._body(record, list(range(len(texts))), 1))
            else:
                r = (await self.client.post("/v1/chunks", json={"texts": texts})).raise_for_status()
                self.chunk_ids.update(zip(texts, (c["id"] for c in r.json()["data"])))

    def _body(self, record: Record, order: list[int], max_tokens: int) -> dict:
        texts = chunk_texts(record)
        common = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
        if self.kind == "vllm":
            return {**common, "prompt": prompt_ids(self.tokenizer, record, [texts[i] for i in order])}
        return {**common, "messages": messages_for(record), "chunks": [self.chunk_ids[texts[i]] for i in order]}

    async def request(self, record: Record, order: list[int]) -> dict:
        path = "/v1/completions" if self.kind == "vllm" else "/v1/chat/completions"
        return await stream_one(self.client, path, self._body(record, order, self.max_tokens))


def prompt_ids(tokenizer, record: Record, texts: list[str]) -> list[int]:
    """The token IDs our server builds for this request (chat template, PREFIX, chunks, question)."""
    from engine.prompt import chat_segments
    from engine.segments import Segment, tokenize

    chunks = [Segment("chunk", tuple(tokenize(tokenizer, t))) for t in texts]
    return [t for s in chat_segments(tokenizer, messages_for(record), chunks, PREFIX) for t in s.token_ids]


async def phase(target: Target, jobs: list[tuple[Record, list[int]]], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(job) -> dict:
        async with gate:
            return await target.request(*job)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(job) for job in jobs))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    gaps = [g for r in ok for g in r["gaps_s"]]
    return {"server": target.kind, "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "wall_s": wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "gap_p50_s": percentile(gaps, 50), "gap_p99_s": percentile(gaps, 99),
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["completion_tokens"] for r in ok) / wall}


def start(kind: str, tmp: Path, model_dir: Path, dtype: str, compile_: bool):
    """The server for `kind`, as a context manager yielding its base URL."""
    from bench.services import start_vllm_server
    from server.launcher import serve_subprocess

    eager = () if compile_ else ("--enforce-eager",)
    if kind == "vllm":  # its own server, in its best CPU configuration (prefix caching is on by default)
        flags = ("--dtype", dtype, "--max-model-len", "8192", "--max-num-batched-tokens", "8192", "--seed", "0", *eager)
        return _url_only(start_vllm_server(model_dir, tmp, flags=flags, startup_timeout_s=900))
    flags = ["--chat-preamble", PREFIX, "--max-queue", "256", "--kv-disk-path", str(tmp / f"kv-{kind}"),
             "--state-dir", str(tmp / f"state-{kind}"), "--dtype", dtype]
    if kind == "vllm-backend":
        flags += ["--backend", "vllm", "--vllm-engine-args", json.dumps({"enforce_eager": not compile_})]
    return serve_subprocess(tmp / f"{kind}.log", flags, startup_timeout_s=900)


@contextlib.contextmanager
def _url_only(served):
    with served as (url, _):
        yield url


async def run_server(kind: str, url: str, args: argparse.Namespace, tokenizer) -> list[dict]:
    records = load(args.dataset)[:args.records]
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=256)) as client:
        target = Target(kind, client, tokenizer, args.max_tokens)
        await target.prepare(records, args.passages)
        rows = []
        phases = plan(records, args.passages, [max(c, args.min_requests) for c in args.concurrencies])
        for c, jobs in zip(args.concurrencies, phases):
            row = await phase(target, jobs, c)
            print(format_row(row), flush=True)
            rows.append(row)
        return rows


def format_row(r: dict) -> str:
    def f(x: Optional[float], d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    return (f"{r['server']:<13} c={r['concurrency']:<3} n={r['requests']:<3} err={r['errors']} "
            f"ttft p50 {f(r['ttft_p50_s'])} p99 {f(r['ttft_p99_s'])} s | gap p50 {f(r['gap_p50_s'], 3)} "
            f"p99 {f(r['gap_p99_s'], 3)} s | {f(r['requests_per_s'], 3)} req/s {f(r['output_tokens_per_s'], 1)} tok/s")


def run_peer(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from config.settings import Settings
    from engine.loader import resolve_model_dir
    from engine.vllm_config import vllm_dtype

    settings = Settings()
    model_dir = resolve_model_dir(settings.model, settings.data_dir)
    dtype = vllm_dtype(settings)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    print(f"dtype {dtype}, {'compiled' if args.compile else 'eager'} vLLM, {args.passages} passages, "
          f"{args.max_tokens} output tokens, concurrency {args.concurrencies}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-load-peer-") as tmp:
        for kind in args.servers:
            with start(kind, Path(tmp), model_dir, dtype, args.compile) as url:
                rows += asyncio.run(run_server(kind, url, args, tokenizer))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
        args.json.write_text(json.dumps({"config": config, "dtype": dtype, "rows": rows}, indent=2))
        from bench.plots import throughput_vs_ttft
        plot = throughput_vs_ttft(rows, args.json.with_suffix(".png"),
                                  f"{args.passages} passages, {args.max_tokens} output tokens, {dtype}")
        print(f"wrote {args.json} and {plot}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1
