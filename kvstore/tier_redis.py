"""Redis tier: serialized chunks shared by every store instance pointed at the same Redis.

Entries expire after `ttl_s`; chunks larger than `max_bytes` are not written. Redis being
down or slow is never an error for the caller: the operation falls back (a miss, a skipped
write), a warning is logged, `errors` counts it, and Redis is left alone for
`retry_after_s` so later calls don't each wait for a timeout.
"""

from __future__ import annotations

from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore import serialize
from kvstore.breaker import Breaker
from kvstore.quant import StoredChunk
from kvstore.tier_base import SharedTier

KEY_PREFIX = "cacheblend:kv:"
REDIS_ERRORS = (redis.RedisError, OSError)


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails after one `timeout_s` instead of retrying with backoff."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0))


class RedisTier(SharedTier):
    def __init__(self, url: str, ttl_s: int, max_bytes: int, timeout_s: float = 0.5,
                 retry_after_s: float = 5.0) -> None:
        super().__init__("redis")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._client = connect(url, timeout_s)
        self._breaker = Breaker("redis", REDIS_ERRORS, retry_after_s, lambda: self.counters.add(errors=1))

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        data = self._breaker.call("GET", lambda: self._client.get(KEY_PREFIX + key), None)
        if data is None:
            return None
        chunk, _ = serialize.from_bytes(key, data)  # whole: the store promotes it
        return chunk, len(data)

    def contains(self, key: str) -> bool:
        return bool(self._breaker.call("EXISTS", lambda: self._client.exists(KEY_PREFIX + key), 0))

    def write_bytes(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        if self._breaker.call("SET", lambda: self._client.set(KEY_PREFIX + key, data, ex=self.ttl_s), False):
            self.counters.add(bytes_written=len(data))

    def remove(self, key: str) -> bool:
        return bool(self._breaker.call("DEL", lambda: self._client.delete(KEY_PREFIX + key), 0))

    def close(self) -> None:
        self._client.close()
