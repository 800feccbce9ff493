"""Faults of load on one server: many streams at once, and clients that hang up mid-stream."""

from __future__ import annotations

import asyncio
import random

import httpx

from bench.faults import Suite
from bench.faults_client import Tally, healthy, idle, metric, rss_bytes

# RSS after the disconnect round may exceed RSS before by this much (allocator caches, the
# metrics' new series) before it counts as a leak; the KV of one prompt is several MB.
LEAK_ALLOWANCE_BYTES = 32 << 20


async def concurrency(suite: Suite, tally: Tally) -> None:
    """All `size.concurrency` streams complete, end with [DONE], and answer as one by one."""
    ref = await suite.reference(tally)
    server = suite.plain()
    async with suite.client(server.url) as client:
        outs = await suite.round(client, tally, ref, suite.picks(suite.size.concurrency))
    tally.check("every_stream_done", all(o.done for o in outs))
    tally.check("answers_equal_one_by_one", sum(o.text == ref.answers[i % len(ref.answers)]
                                                for i, o in enumerate(outs)) == len(outs))
    tally.survived(1, tally.ok and healthy(server.url))


async def _cut(client: httpx.AsyncClient, body: dict, rng: random.Random, max_events: int) -> None:
    """Hang up at a random point: before the answer starts (a timer), or after some SSE events."""
    try:
        if rng.random() < 0.25:
            await asyncio.wait_for(_hang_up_after(client, body, 1 << 30), timeout=rng.uniform(0.01, 0.5))
        else:
            await _hang_up_after(client, body, rng.randint(0, max_events))
    except (asyncio.TimeoutError, httpx.HTTPError):
        pass


async def _hang_up_after(client: httpx.AsyncClient, body: dict, events: int) -> None:
    """Read `events` SSE events, then close the connection (leaving the block without reading on)."""
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen > events:
                return


async def disconnects(suite: Suite, tally: Tally) -> None:
    """Streams cut at random points next to streams that run to the end: the cut ones are
    aborted, the slots empty, memory goes back, and the others answer as one by one."""
    ref = await suite.reference(tally)
    server = suite.plain()
    size, rng = suite.size, random.Random(0)
    bodies = [suite.body(suite.queries[i % len(suite.queries)], ref.ids) for i in range(size.disconnects)]

    async def cut_round(client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(_cut(client, b, rng, size.max_tokens) for b in bodies),
                             suite.round(client, tally, ref, suite.picks(size.concurrency)))

    async with suite.client(server.url) as client:
        # the same round once before measuring: memory at its working level, the abort path's
        # allocator caches included (a leak grows with every round; a cache does not)
        await cut_round(client)
        tally.check("idle_before", idle(server.url))
        rss_before = rss_bytes(server.pid)
        aborted_before = metric(server.url, "cacheblend:requests_total", status="aborted")
        await cut_round(client)
        tally.check("idle_after", idle(server.url), "requests still running or waiting after every client left")
        tally.check("running_gauge_zero", metric(server.url, "cacheblend:num_requests_running") == 0)
        aborted = metric(server.url, "cacheblend:requests_total", status="aborted") - aborted_before
        tally.note(f"{size.disconnects} disconnects, {aborted:.0f} requests aborted by the server")
        tally.check("aborted_counted", aborted > 0, "no request was aborted")
        tally.bytes_leaked = max(0, rss_bytes(server.pid) - rss_before)
        tally.check("memory_returned", tally.bytes_leaked <= LEAK_ALLOWANCE_BYTES, f"{tally.bytes_leaked} bytes")
        await suite.round(client, tally, ref, suite.picks(size.concurrency))  # the freed slots work
    tally.survived(size.disconnects, tally.ok and healthy(server.url))
