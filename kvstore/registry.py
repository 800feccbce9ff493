"""Chunk registry: resolves a chunk ID (its key) to the text and tokens it was made from.

With it a chunk whose KV was evicted everywhere can still be recomputed from its ID.
Records are {"key", "text", "token_ids", "created" (unix seconds), "tenant" (the owner),
"shared" (visible to every tenant)}; records written before tenants existed lack the last two
and read as tenant "default", not shared. They live as JSON files at
`<root>/<key[:2]>/<key>.json` (atomic writes). With Redis configured they are also kept there
(`cacheblend:chunk:<key>`, no TTL, plus the sorted set `cacheblend:chunks` scored by created),
so any node can resolve and list IDs registered on another; records fetched from Redis are
cached locally. If Redis fails the registry carries on with its local files, and local records
Redis may lack (all of them at start-up, those added while it was down) are published at the
next add or listing that reaches it (all of them again after any Redis error), so a fresh or
restarted Redis lists them too. A delete
removes the record here and in Redis; another node's cached copy stays (as its local KV
tiers do).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from kvstore.atomic import atomic_write, remove_temp_files
from kvstore.breaker import Breaker
from kvstore.keys import check_key, is_key, shard_files, shard_path

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

RECORD_PREFIX = "cacheblend:chunk:"
INDEX_KEY = "cacheblend:chunks"
SUFFIX = ".json"

Record = dict[str, Any]
Records = list[Record]  # named here: inside the class, `list` is the method
DEFAULT_TENANT = "default"


def owner(record: Record) -> str:
    return record.get("tenant", DEFAULT_TENANT)


def visible(record: Record, tenant: Optional[str]) -> bool:
    """Whether `tenant` may see the record (None: no tenant filter)."""
    return tenant is None or bool(record.get("shared")) or owner(record) == tenant


def _valid(record: object, key: str) -> bool:
    return (isinstance(record, dict) and record.get("key") == key and isinstance(record.get("text"), str)
            and isinstance(record.get("created"), int)
            and isinstance(record.get("token_ids"), list)
            and all(isinstance(t, int) for t in record["token_ids"])
            and isinstance(record.get("tenant", DEFAULT_TENANT), str) and isinstance(record.get("shared", False), bool))


def _parse(data: Optional[bytes], key: str) -> Optional[Record]:
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not _valid(record, key):
        log.warning("chunk registry: ignoring malformed record for %s", key)
        return None
    return record


class ChunkRegistry:
    """Chunk key -> record, persisted under `root` and optionally in Redis. Thread-safe."""

    def __init__(self, root: Path, redis_url: Optional[str] = None, redis_timeout_s: float = 0.5,
                 retry_after_s: float = 5.0) -> None:
        self.root = Path(root)
        self.errors = 0  # Redis failures
        self._lock = threading.Lock()
        self._created: dict[str, int] = {}
        self._meta: dict[str, Record] = {}  # key -> {"tenant", "shared", "tokens"}: filters and counts without file reads
        self._order: list[tuple[int, str]] = []  # sorted (created, key): the listing order
        self._unpublished: set[str] = set()  # local records Redis may not hold yet
        self._stale: set[str] = set()  # local records changed since Redis got them (overwrite there)
        self._redis: Optional["redis.Redis"] = None
        errors: tuple[type[BaseException], ...] = ()
        if redis_url:
            from kvstore.tier_redis import REDIS_ERRORS, connect  # redis imports slowly: only when used

            self._redis = connect(redis_url, redis_timeout_s)
            errors = REDIS_ERRORS
        self._breaker = Breaker("redis (chunk registry)", errors, retry_after_s, self._count_error)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.root)
        self._scan()

    def _count_error(self) -> None:
        self.errors += 1
        with self._lock:  # Redis may come back empty (a restart): publish everything again then
            self._unpublished.update(self._created)

    def _path(self, key: str) -> Path:
        return shard_path(self.root, key, SUFFIX)

    def _scan(self) -> None:
        for key, _ in shard_files(self.root, SUFFIX):
            record = self._read_local(key)
            if record is not None:
                self._index(record)

    def _index(self, record: Record) -> None:
        """Add to the in-memory index; the caller holds the lock (or is the constructor)."""
        key, created = record["key"], record["created"]
        if self._redis is not None:
            self._unpublished.add(key)
        self._meta[key] = {"tenant": owner(record), "shared": bool(record.get("shared")), "tokens": len(record["token_ids"])}
        if key not in self._created:
            self._created[key] = created
            bisect.insort(self._order, (created, key))

    def _read_local(self, key: str) -> Optional[Record]:
        try:
            return _parse(self._path(key).read_bytes(), key)
        except FileNotFoundError:
            return None

    def _write_local(self, record: Record) -> None:
        atomic_write(self._path(record["key"]), json.dumps(record).encode())
        with self._lock:
            self._index(record)

    def add(self, key: str, text: str, token_ids: Sequence[int], tenant: str = DEFAULT_TENANT,
            shared: bool = False) -> Record:
        """Register a chunk; an already registered key keeps (and returns) its first record,
        except that `shared` marks it shared (keys are per tenant salt, so only the unsalted
        "default" keys meet shared ones)."""
        check_key(key)
        existing = self.get(key)
        if existing is not None and (existing.get("shared") or not shared):
            return existing
        if existing is not None:
            record = {**existing, "shared": True}
            self._write_local(record)
            self._overwrite_redis(record)
            return record
        record = {"key": key, "text": text, "token_ids": [int(t) for t in token_ids], "created": int(time.time()),
                  "tenant": tenant, "shared": shared}
        self._write_local(record)
        self._sync()
        return record

    def _overwrite_redis(self, record: Record) -> None:
        """A changed record replaces Redis's copy, now or at the next sync if Redis is down
        (a first publish never overwrites: two nodes may register one key at once)."""
        if self._redis is not None:
            with self._lock:
                self._stale.add(record["key"])
            self._sync()

    def usage(self, tenant: str) -> tuple[int, int]:
        """(chunks, tokens) of the records `tenant` owns, among those this node holds."""
        with self._lock:
            owned = [m["tokens"] for m in self._meta.values() if m["tenant"] == tenant]
        return len(owned), sum(owned)

    def _sync(self) -> None:
        """Publish the local records Redis may lack (skipped while it is down)."""
        with self._lock:
            keys = list(self._unpublished | self._stale)
            stale = set(self._stale)
        if not keys or self._redis is None:
            return
        records = [r for r in (self._read_local(k) for k in keys) if r is not None]
        redis_client = self._redis

        def publish() -> bool:
            pipe = redis_client.pipeline()
            for r in records:
                pipe.set(RECORD_PREFIX + r["key"], json.dumps(r), nx=r["key"] not in stale)
                pipe.zadd(INDEX_KEY, {r["key"]: r["created"]}, nx=True)
            pipe.execute()
            return True

        if self._breaker.call("SET", publish, False):
            with self._lock:
                self._unpublished.difference_update(keys)
                self._stale.difference_update(stale)

    def get(self, key: str) -> Optional[Record]:
        """The record of `key`, from local files or else Redis; None if unknown."""
        check_key(key)
        record = self._read_local(key)
        if record is None and self._redis is not None:
            redis_client = self._redis
            record = _parse(self._breaker.call("GET", lambda: redis_client.get(RECORD_PREFIX + key), None), key)
            if record is not None:
                self._write_local(record)
                with self._lock:
                    self._unpublished.discard(key)  # it came from Redis
        return record

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not is_key(key):
            return False
        return self.get(key) is not None

    def delete(self, key: str) -> bool:
        """Forget `key` locally and in Redis; True if it was known."""
        check_key(key)
        with self._lock:
            created = self._created.pop(key, None)
            self._meta.pop(key, None)
            self._unpublished.discard(key)
            self._stale.discard(key)
            if created is not None:
                self._order.pop(bisect.bisect_left(self._order, (created, key)))
        found = created is not None
        try:
            self._path(key).unlink()
            found = True
        except FileNotFoundError:
            pass
        if self._redis is not None:
            redis_client = self._redis

            def remove() -> int:
                pipe = redis_client.pipeline()
                pipe.delete(RECORD_PREFIX + key)
                pipe.zrem(INDEX_KEY, key)
                return int(pipe.execute()[0])

            found |= bool(self._breaker.call("DEL", remove, 0))
        return found

    def __len__(self) -> int:
        """Records in the local files (not counting ones only in Redis)."""
        with self._lock:
            return len(self._created)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    def list(self, after: Optional[str] = None, limit: int = 100, tenant: Optional[str] = None) -> Records:
        """Up to `limit` records ordered by (created, key), starting after the key `after`;
        with `tenant`, only the ones it owns and the shared ones.

        Raises ValueError if `after` is not a registered key (that `tenant` may see).
        """
        if after is not None:
            record = self.get(after)
            if record is None or not visible(record, tenant):  # one message: no hint of others' keys
                raise ValueError(f"unknown chunk id {after}")
        if limit < 1:
            return []
        if self._redis is not None:
            self._sync()
            page = self._breaker.call("list", lambda: self._list_redis(after, limit, tenant), None)
            if page is not None:
                return page
        return self._list_local(after, limit, tenant)

    def _list_redis(self, after: Optional[str], limit: int, tenant: Optional[str]) -> Records:
        assert self._redis is not None
        start = 0
        if after is not None:
            rank = self._redis.zrank(INDEX_KEY, after)
            if rank is None:
                raise ValueError(f"unknown chunk id {after}")
            start = rank + 1
        page: Records = []
        batch = max(limit, 100)  # other tenants' records are skipped: read ahead
        while len(page) < limit:
            members = self._redis.zrange(INDEX_KEY, start, start + batch - 1)
            if not members:
                break
            start += len(members)
            keys = [k for k in (m.decode(errors="replace") for m in members) if is_key(k)]
            datas = self._redis.mget([RECORD_PREFIX + k for k in keys]) if keys else []
            page += [r for r in (_parse(d, k) for k, d in zip(keys, datas)) if r is not None and visible(r, tenant)]
        return page[:limit]

    def _list_local(self, after: Optional[str], limit: int, tenant: Optional[str]) -> Records:
        with self._lock:
            start = 0
            if after is not None:
                created = self._created.get(after)
                if created is None:
                    raise ValueError(f"unknown chunk id {after}")
                start = bisect.bisect_right(self._order, (created, after))
            seen = (k for _, k in itertools.islice(self._order, start, None) if visible(self._meta[k], tenant))
            keys = list(itertools.islice(seen, limit))
        return [r for r in (self._read_local(k) for k in keys) if r is not None]
