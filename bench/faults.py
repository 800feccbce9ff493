"""`cacheblend bench faults`: the fault suite. Real server processes, a real redis-server, a real
moto S3 server; each fault is injected for real and the suite prints (and writes as JSON) what
the server held: requests sent, completed, refused, failed and lost, faults injected and
survived, bytes leaked, the slowest request, and the checks of each fault.

Workload: MuSiQue dev questions (0-49) in the reference layout (bench.dataset): each question's
first passages (cut to a few hundred characters, so a CI run stays short) are chunks, and
answers are greedy. Answers are checked against a reference: the same requests run one by one
on a server with no fault (`Suite.reference`), whenever the fault leaves the chunk KV where it
can be read back (a chunk recomputed at request time is used unrounded, and may legitimately
answer differently from its stored copy).

    cacheblend bench faults --size ci --only concurrency,bad_input
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Optional

import httpx

from bench.dataset import DEFAULT_DATASET, PREFIX, chunk_texts, load, messages_for, select_questions, truncate
from bench.faults_client import Outcome, Tally, metric, register_texts, stream_chat
from bench.services import start_server_process

API_KEY = "bench-faults-key"
MAX_BODY_BYTES = 1 << 20  # small, so that the oversize-body cases stay cheap


@dataclass(frozen=True)
class Size:
    concurrency: int        # streaming requests at once (and per load round)
    records: int            # dev questions used
    passages: int           # chunks per request
    passage_chars: int      # passages cut to this length
    max_tokens: int
    disconnects: int        # requests cut off mid-stream
    s3_delay_s: float       # a stalled S3 connection is held this long, then dropped
    latency_bound_s: float  # no request may take longer while S3 stalls
    timeout_s: float        # a request unanswered after this is lost


SIZES = {
    "ci": Size(concurrency=8, records=3, passages=2, passage_chars=200, max_tokens=8, disconnects=8,
               s3_delay_s=0.5, latency_bound_s=30.0, timeout_s=120.0),
    "full": Size(concurrency=64, records=16, passages=3, passage_chars=600, max_tokens=32, disconnects=64,
                 s3_delay_s=3.0, latency_bound_s=120.0, timeout_s=600.0),
}


@dataclass(frozen=True)
class Query:
    messages: list[dict]
    texts: tuple[str, ...]  # chunk texts, in prompt order


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    state_dir: Path


@dataclass(frozen=True)
class Reference:
    ids: dict[str, str]  # chunk text -> ID (content keys: the same on every server of the suite)
    answers: list[str]   # greedy answer per query, run one by one
    chunk_bytes: int     # stored KV of one chunk, on average (to size tiers in chunks)


def workload(size: Size) -> list[Query]:
    records = select_questions(load(DEFAULT_DATASET), 0, 49, limit=size.records)
    return [Query(messages_for(r), tuple(chunk_texts(truncate(r, size.passage_chars), size.passages)))
            for r in records]


class Suite:
    """What faults share: the size, the workload, server starts, the plain server, the reference."""

    def __init__(self, size: Size, stack: contextlib.ExitStack, workdir: Optional[Path] = None):
        self.size = size
        self.stack = stack
        self.queries = workload(size)
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-faults-")))
        self.workdir = workdir
        self._plain: Optional[Server] = None
        self._reference: Optional[Reference] = None

    @contextlib.contextmanager
    def server(self, name: str, env: Optional[dict] = None, **settings) -> Iterator[tuple[str, object]]:
        """A server with the suite's settings plus `settings`, its state in a folder named `name`
        (the same name: the same chunk registry and disk KV)."""
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        # float32: the faults' answer checks compare greedy text across different batchings, and
        # bf16 GEMMs are not batch-invariant (a near-tie flipped a CI-size answer under 8 streams)
        common = {"api_key": API_KEY, "chat_preamble": PREFIX, "max_body_bytes": MAX_BODY_BYTES,
                  "max_queue": max(64, 4 * self.size.concurrency), "dtype": "float32"}
        with start_server_process(state, env=env, **{**common, **settings}) as served:
            yield served

    def plain(self) -> Server:
        """The shared server with default settings (started once, stopped at the end)."""
        if self._plain is None:
            url, proc = self.stack.enter_context(self.server("plain"))
            self._plain = Server(url, proc.pid, self.workdir / "plain")
        return self._plain

    def client(self, url: str) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=2 * self.size.concurrency + 8)
        return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=self.size.timeout_s, limits=limits)

    def body(self, query: Query, ids: dict[str, str]) -> dict:
        return {"messages": query.messages, "chunks": [ids[t] for t in query.texts],
                "max_tokens": self.size.max_tokens, "temperature": 0}

    async def register_all(self, client: httpx.AsyncClient, tally: Tally,
                           queries: Optional[list[Query]] = None) -> dict[str, str]:
        """Register the chunk texts of `queries` (default: all), one request per query; text -> ID."""
        ids: dict[str, str] = {}
        for q in self.queries if queries is None else queries:
            ids.update(zip(q.texts, await register_texts(client, list(q.texts), self.size.timeout_s, tally)))
        return ids

    async def warm(self, client: httpx.AsyncClient, ids: dict[str, str]) -> None:
        """One request first, uncounted: its instruction prefix enters the prefix cache, so no
        measured request is the one that computes it (a different computation order)."""
        await stream_chat(client, self.body(self.queries[0], ids), self.size.timeout_s)

    def picks(self, n: int) -> list[int]:
        """`n` requests cycling through the workload (query indices)."""
        return [i % len(self.queries) for i in range(n)]

    def picks_of(self, queries: list[Query]) -> list[int]:
        return [self.queries.index(q) for q in queries]

    async def round(self, client: httpx.AsyncClient, tally: Tally, ref: Reference, picks: list[int],
                    check_answers: bool = True, refusals: frozenset = frozenset()) -> list[Outcome]:
        """The queries `picks` as streaming requests all at once, counted in `tally` (answers
        checked against the reference unless not `check_answers`; by default a 503 fails too)."""
        outs = await asyncio.gather(*(stream_chat(client, self.body(self.queries[i], ref.ids), self.size.timeout_s)
                                      for i in picks))
        for i, o in zip(picks, outs):
            tally.count(o, expected=ref.answers[i] if check_answers else None, refusals=refusals)
        return list(outs)

    async def reference(self, tally: Tally) -> Reference:
        """The workload's chunk IDs and answers, run one by one on the plain server (once)."""
        if self._reference is None:
            async with self.client(self.plain().url) as client:
                ids = await self.register_all(client, tally)
                await self.warm(client, ids)
                answers = []
                for q in self.queries:
                    o = await stream_chat(client, self.body(q, ids), self.size.timeout_s)
                    tally.count(o, refusals=frozenset())
                    answers.append(o.text)
            stored = metric(self.plain().url, "cacheblend:kv_bytes_used", tier="cpu")
            self._reference = Reference(ids, answers, int(stored / max(1, len(set(ids.values())))))
        return self._reference


Fault = Callable[[Suite, Tally], Awaitable[None]]


# name -> (module, function), in the order they run; imported only when run
FAULTS = {
    "concurrency": ("bench.faults_load", "concurrency"),
    "redis": ("bench.faults_remote", "redis_restart"),
    "s3": ("bench.faults_remote", "s3_stall"),
    "disk_full": ("bench.faults_disk", "disk_full"),
    "sigkill": ("bench.faults_kill", "sigkill"),
    "disconnects": ("bench.faults_load", "disconnects"),
    "bad_input": ("bench.faults_inputs", "bad_inputs"),
}


def fault(name: str) -> Fault:
    module, function = FAULTS[name]
    return getattr(importlib.import_module(module), function)


async def _run_one(suite: Suite, name: str, run_fault: Fault) -> Tally:
    tally = Tally(name)
    start = time.perf_counter()
    try:
        await run_fault(suite, tally)
    except Exception as e:  # the bench's own failure (or the server's): recorded, the rest still run
        tally.check("ran", False, f"{type(e).__name__}: {e}")
    tally.wall_s = round(time.perf_counter() - start, 2)
    return tally


def run_suite(size_name: str = "ci", only: Optional[list[str]] = None, keep: Optional[Path] = None) -> dict:
    """Run the faults (all, or those named in `only`) and return the report. Servers' state and
    logs go to a temporary folder, or to `keep`, which is left in place."""
    names = only or list(FAULTS)
    unknown = set(names) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        suite = Suite(SIZES[size_name], stack, keep)
        tallies = [asyncio.run(_run_one(suite, name, fault(name))) for name in names]
    return {"size": size_name, "config": vars(SIZES[size_name]), "wall_s": round(time.perf_counter() - start, 2),
            "ok": all(t.ok for t in tallies), "faults": [t.report() for t in tallies]}


def print_table(report: dict) -> None:
    print(f"{'fault':<12} {'sent':>5} {'done':>5} {'refus':>5} {'fail':>5} {'lost':>5} {'inj':>4} {'surv':>4} "
          f"{'leaked':>10} {'max_lat':>8} {'wall':>7}  result")
    for f in report["faults"]:
        leaked = "-" if f["bytes_leaked"] is None else str(f["bytes_leaked"])
        lat = "-" if f["max_latency_s"] is None else f"{f['max_latency_s']:.2f}"
        failed_checks = ",".join(k for k, v in f["checks"].items() if not v)
        result = f"skipped: {f['skipped']}" if f["skipped"] else "ok" if f["ok"] else f"FAILED {failed_checks}"
        print(f"{f['name']:<12} {f['sent']:>5} {f['completed']:>5} {f['refused']:>5} {f['failed']:>5} "
              f"{f['lost']:>5} {f['faults_injected']:>4} {f['faults_survived']:>4} {leaked:>10} {lat:>8} "
              f"{f['wall_s']:>7.1f}  {result}")
        for note in f["notes"][:5]:
            print(f"    {note}")
    print(f"size {report['size']}, {report['wall_s']:.1f} s, {'all held' if report['ok'] else 'NOT all held'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faults", help="fault suite against real server processes, redis and S3: what each fault cost")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="ci: a small run for the test suite")
    p.add_argument("--only", default=None, help=f"comma list of faults to run (default: all of {', '.join(FAULTS)})")
    p.add_argument("--json", type=Path, default=Path("out/bench_faults.json"), help="write the report here")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="a new folder for the servers' state and logs, left in place (default: a temp folder)")
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    report = run_suite(args.size, [n for n in args.only.split(",") if n] if args.only else None, args.keep)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1
