"""SIGKILL of the server during chunk registration, and during write-back to its disk tier; each
time a new server starts on the same state folder and every chunk either loads and verifies or
is ignored (unknown: a clean 404) and recomputed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Iterator

import httpx

from bench.faults import Query, Reference, Suite
from bench.faults_client import Outcome, Tally, healthy, metric, post, stream_chat
from bench.faults_disk import scan_kv

STATE = "kill"


@contextlib.contextmanager
def _killable(suite: Suite, **settings) -> Iterator[tuple[str, object]]:
    """A server on the suite's kill state that the body may SIGKILL (its exit is then no error)."""
    proc = None
    try:
        with suite.server(STATE, **settings) as (url, proc):
            yield url, proc
    except RuntimeError as e:
        if proc is None or proc.returncode != -signal.SIGKILL or "after SIGTERM" not in str(e):
            raise


async def _kill_when(proc, probe, timeout_s: float = 60.0) -> bool:
    """SIGKILL `proc` as soon as `probe()` holds (or after `timeout_s`); whether it held first."""
    deadline = time.monotonic() + timeout_s
    held = False
    while time.monotonic() < deadline and not (held := await asyncio.to_thread(probe)):
        await asyncio.sleep(0.02)
    proc.kill()
    proc.wait()
    return held


def _texts(queries: list[Query]) -> list[str]:
    return list(dict.fromkeys(t for q in queries for t in q.texts))


async def sigkill(suite: Suite, tally: Tally) -> None:
    """Kill 1: while a batch of chunks registers (write-through). Kill 2: while a small cpu tier
    writes evicted chunks back to disk. After each, and on a final server, `_verify` all chunks."""
    ref = await suite.reference(tally)
    n = len(suite.queries)
    a, b = max(1, n // 4), max(2, 3 * n // 4)
    first, second, third = suite.queries[:a], suite.queries[a:b], suite.queries[b:]
    kv = suite.workdir / STATE / "kv"
    with _killable(suite) as (url, proc):
        async with suite.client(url) as client:
            await suite.register_all(client, tally, first)
            pending = asyncio.ensure_future(post(client, "/v1/chunks", {"texts": _texts(second)}, suite.size.timeout_s))
            probe = f"{url}/v1/chunks/{ref.ids[second[0].texts[0]]}"  # its record is written first
            held = await _kill_when(proc, lambda: httpx.get(probe, headers=client.headers).status_code == 200)
            # the connection dropped with the server: the fault, not a lost request
            tally.check("killed_mid_registration", held and (await pending)[0].status is None)
    _scan(tally, kv, "after kill 1")
    # Write-back with a cpu tier of two chunks: registering evicts chunks to disk in the background.
    with _killable(suite, kv_disk_write="back", kv_cpu_bytes=2 * ref.chunk_bytes) as (url, proc):
        async with suite.client(url) as client:
            await _verify(suite, tally, client, ref, first + second)
            disk = lambda: metric(url, "cacheblend:kv_bytes_stored_total", tier="disk")  # noqa: E731
            before = disk()
            # new chunks, and requests that cycle the cpu tier: evicted chunks are written back
            timeout = suite.size.timeout_s
            pending = asyncio.gather(post(client, "/v1/chunks", {"texts": _texts(third)}, timeout),
                                     *(stream_chat(client, suite.body(q, ref.ids), timeout) for q in suite.queries))
            tally.check("killed_mid_write_back", await _kill_when(proc, lambda: disk() > before))
            await pending  # cut by the kill: not counted
    _scan(tally, kv, "after kill 2")
    with suite.server(STATE) as (url, _):
        async with suite.client(url) as client:
            await _verify(suite, tally, client, ref, suite.queries)
        tally.note(f"corrupt blobs found and dropped by the last server: "
                   f"{metric(url, 'cacheblend:kv_corrupt_blobs_total'):.0f}")
        tally.survived(2, tally.ok and healthy(url))


def _scan(tally: Tally, kv, when: str) -> None:
    found = scan_kv(kv)
    tally.note(f"{when}: {len(found.files)} chunk files, {len(found.corrupt)} corrupt, {found.temps} temp files")
    tally.check("no_half_written_file", not found.corrupt, f"{when}: {found.corrupt}")


async def _verify(suite: Suite, tally: Tally, client: httpx.AsyncClient, ref: Reference, queries: list[Query]) -> None:
    """What a restarted server makes of the chunks of `queries`: each ID is known or a clean 404;
    requests naming them answer or get a 404 (their answers are not compared: a chunk recomputed at
    request time is used unrounded); registered again (stored KV loaded and verified, missing KV
    computed), they answer as one by one."""
    for text in _texts(queries):
        tally.count(await _get(client, f"/v1/chunks/{ref.ids[text]}"), refusals=frozenset({404}))
    picks = suite.picks_of(queries)
    await suite.round(client, tally, ref, picks, check_answers=False, refusals=frozenset({404}))
    await suite.register_all(client, tally, queries)
    await suite.warm(client, ref.ids)
    await suite.round(client, tally, ref, picks)


async def _get(client: httpx.AsyncClient, path: str) -> Outcome:
    start = time.perf_counter()
    try:
        response = await client.get(path)
    except httpx.HTTPError as e:
        return Outcome(None, error=f"{type(e).__name__}: {e}", latency_s=time.perf_counter() - start)
    error = None if response.status_code == 200 else response.text[:300]
    return Outcome(response.status_code, done=True, error=error, latency_s=time.perf_counter() - start)
