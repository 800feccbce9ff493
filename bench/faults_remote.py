"""Faults of the shared tiers: Redis killed and restarted mid-run, the S3 endpoint stalling."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from urllib.parse import urlparse

import httpx

from bench.faults import Suite
from bench.faults_client import Tally, healthy, metric, register_texts, stream_chat
from bench.faults_proxy import StallProxy
from bench.services import start_moto, start_redis
from kvstore.registry import INDEX_KEY
from kvstore.tier_redis import KEY_PREFIX

BUCKET = "bench-faults"
RECOVERY_S = 30.0  # the breakers retry after 5 s; anything past this is not recovering
STALLED_REQUESTS = 4


async def _until(probe, timeout_s: float = RECOVERY_S, every_s: float = 0.5) -> bool:
    """Call (and await, if a coroutine function) `probe()` until it is true (False after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return True
        await asyncio.sleep(every_s)
    return False


async def redis_restart(suite: Suite, tally: Tally) -> None:
    """Requests keep answering (as one by one) while Redis is gone; once it is back (empty),
    chunks registered after that reach it again, and it lists every chunk again."""
    import redis

    ref = await suite.reference(tally)
    n = len(suite.queries)
    with start_redis() as redis_server, suite.server("redis", redis_url=redis_server.url) as (url, _):
        r = redis.Redis.from_url(redis_server.url)
        async with suite.client(url) as client:
            tally.check("same_ids", await suite.register_all(client, tally) == ref.ids)
            await suite.warm(client, ref.ids)
            tally.check("redis_written", await _until(
                lambda: metric(url, "cacheblend:kv_bytes_stored_total", tier="redis") > 0))
            await suite.round(client, tally, ref, suite.picks(n))
            redis_server.kill()
            outage = [f"Written while Redis was down ({i}).\n\n{t}" for i, t in enumerate(suite.queries[0].texts)]
            await asyncio.gather(suite.round(client, tally, ref, suite.picks(n)),
                                 register_texts(client, outage, suite.size.timeout_s, tally))
            redis_server.restart()
            await suite.round(client, tally, ref, suite.picks(n))
            probes = itertools.count()

            async def kv_reaches_redis() -> bool:
                text = f"Written after Redis came back ({next(probes)}).\n\n{suite.queries[0].texts[0]}"
                ids = await register_texts(client, [text], suite.size.timeout_s, tally)
                await asyncio.sleep(0.5)  # the shared-tier write is in the background
                return bool(ids) and bool(r.exists(KEY_PREFIX + ids[0]))

            tally.check("kv_reaches_redis_again", await _until(kv_reaches_redis))

            async def lists_every_chunk() -> bool:
                await client.get("/v1/chunks")  # a listing publishes what Redis lacks
                return all(r.zscore(INDEX_KEY, i) is not None for i in ref.ids.values())

            tally.check("index_republished", await _until(lists_every_chunk))
            await suite.round(client, tally, ref, suite.picks(n))
        tally.survived(1, tally.ok and healthy(url))


async def s3_stall(suite: Suite, tally: Tally) -> None:
    """S3 under a cpu tier of about three chunks (no disk), behind a proxy that stalls, then drops,
    every connection: requests fall back to recomputing within a bound, none hangs, and once S3
    answers again chunks come from it and answer as one by one."""
    ref = await suite.reference(tally)
    n = len(suite.queries)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log: a line per S3 call
    with start_moto() as s3:
        s3.create_bucket(BUCKET)
        proxy = StallProxy(urlparse(s3.endpoint).port, suite.size.s3_delay_s)
        try:
            with suite.server("s3", env=s3.env, s3_endpoint=proxy.url, s3_bucket=BUCKET,
                              kv_cpu_bytes=3 * ref.chunk_bytes, kv_disk_bytes=0) as (url, _):
                async with suite.client(url) as client:
                    await _stall_run(suite, tally, ref, client, proxy, s3, n)
                tally.survived(1, tally.ok and healthy(url))
        finally:
            proxy.close()


async def _stall_run(suite: Suite, tally: Tally, ref, client: httpx.AsyncClient, proxy: StallProxy, s3, n: int) -> None:
    tally.check("same_ids", await suite.register_all(client, tally) == ref.ids)
    objects = lambda: s3.client().list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)  # noqa: E731
    tally.check("chunks_in_s3", await _until(lambda: objects() >= len(ref.ids)))
    await suite.warm(client, ref.ids)
    outs = await suite.round(client, tally, ref, suite.picks(n))
    tally.check("served_from_s3", any("s3" in (o.info or {}).get("chunk_hits", {}) for o in outs))
    proxy.stall()
    # Answers are not compared: a chunk recomputed at request time is used unrounded. A few
    # requests only: each recomputes its chunks, which the bound is not about.
    stalled = await suite.round(client, tally, ref, suite.picks(min(n, STALLED_REQUESTS)), check_answers=False)
    worst = max(o.latency_s for o in stalled)
    tally.note(f"while stalled: slowest request {worst:.2f} s, {proxy.dropped} S3 connections held and dropped")
    tally.check("bounded_fallback", worst <= suite.size.latency_bound_s, f"{worst:.1f} s")
    tally.check("stall_hit", proxy.dropped > 0, "no S3 connection was stalled")
    proxy.resume()

    queries = itertools.cycle(range(len(suite.queries)))  # so that chunks fall out of the small cpu tier

    async def from_s3_again() -> bool:
        o = await stream_chat(client, suite.body(suite.queries[next(queries)], ref.ids), suite.size.timeout_s)
        tally.count(o)
        return "s3" in (o.info or {}).get("chunk_hits", {})

    tally.check("s3_used_again", await _until(from_s3_again))
    await suite.round(client, tally, ref, suite.picks(n))
