"""Tenants: who an API key speaks for, the salt that isolates its caches, and its limits.

Keys file (`api_keys_file`, JSON): a list of {"tenant", "key_sha256", "admin", "max_stored_bytes",
"max_chunks", "max_requests_in_flight"}; only hashes of keys are on disk (`cacheblend keys hash`
prints one). One tenant may have several keys (rotation) if its entries agree. `api_key` stays
the simple set-up: tenant "default", admin. With neither, every request is "default" (an open
server). SIGHUP reloads the file (server/cli.py); a bad file is logged and the old table kept.

Isolation is by salt: a tenant's chunk, turn and prefix-cache keys are salted with a value
derived from its name (the same on every replica and after a restart), so the same text under
two tenants is two entries and one tenant's cache state never shows in another's latency.
"default" and shared chunks have the empty salt, so keys made before tenants existed stay valid.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kvstore.registry import DEFAULT_TENANT
from server.errors import APIError

log = logging.getLogger(__name__)

DEFAULT = DEFAULT_TENANT  # what records written before tenants existed belong to
LIMIT_RETRY_AFTER_S = "1"  # requests in flight end soon; stored chunks only when the tenant deletes some


@dataclass(frozen=True)
class Limits:
    """None: unlimited."""
    max_stored_bytes: Optional[int] = None
    max_chunks: Optional[int] = None
    max_requests_in_flight: Optional[int] = None


def tenant_salt(name: str) -> str:
    """Derived, not stored: every replica computes the same salt for the same tenant."""
    return "" if name == DEFAULT else hashlib.sha256(b"cacheblend-tenant\0" + name.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    limits: Limits = Limits()
    salt: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "salt", tenant_salt(self.name))


def request_salt(tenant: Tenant, cache_salt: Optional[str]) -> str:
    """The salt of one request: its tenant's, further split by the request's `cache_salt`."""
    if not cache_salt:
        return tenant.salt
    return hashlib.sha256(b"cacheblend-cache-salt\0" + tenant.salt.encode() + b"\0" + cache_salt.encode()).hexdigest()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    """One line of the keys file."""
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    admin: bool = False
    max_stored_bytes: Optional[int] = Field(None, ge=0)
    max_chunks: Optional[int] = Field(None, ge=0)
    max_requests_in_flight: Optional[int] = Field(None, ge=1)

    def to_tenant(self) -> Tenant:
        return Tenant(self.tenant, self.admin, Limits(self.max_stored_bytes, self.max_chunks, self.max_requests_in_flight))


_ENTRIES = TypeAdapter(list[KeyEntry])


def _build(entries: list[KeyEntry]) -> list[tuple[bytes, Tenant]]:
    """(key hash, tenant) pairs; ValueError for a repeated key or a tenant whose entries disagree."""
    pairs: list[tuple[bytes, Tenant]] = []
    tenants: dict[str, Tenant] = {}
    for entry in entries:
        digest = bytes.fromhex(entry.key_sha256)
        if any(d == digest for d, _ in pairs):
            raise ValueError(f"a key of tenant {entry.tenant!r} is listed twice")
        tenant = tenants.setdefault(entry.tenant, entry.to_tenant())
        if tenant != entry.to_tenant():
            raise ValueError(f"tenant {entry.tenant!r} has entries with different admin or limits")
        pairs.append((digest, tenant))
    return pairs


class TenantTable:
    """API key -> Tenant. `reload()` may run at any time (a signal handler): lookups see the old
    table or the new one, never a mix."""

    def __init__(self, api_key: Optional[str] = None, path: Optional[Path] = None):
        self.path = path
        self._api_key = KeyEntry(tenant=DEFAULT, key_sha256=hash_key(api_key), admin=True) if api_key else None
        self.open = api_key is None and path is None  # no keys at all: everyone is "default"
        self.default = Tenant(DEFAULT, admin=True)
        self._pairs = _build(self._entries())

    @classmethod
    def from_settings(cls, settings) -> "TenantTable":
        return cls(settings.api_key, settings.api_keys_file)

    def _entries(self) -> list[KeyEntry]:
        entries = [self._api_key] if self._api_key else []
        if self.path is not None:
            try:
                entries += _ENTRIES.validate_json(Path(self.path).read_bytes())
            except ValidationError as e:  # without the input values: a plain key put there by mistake stays out of logs
                problems = "; ".join(f"[{'.'.join(map(str, err['loc'])) or 'file'}] {err['msg']}"
                                     for err in e.errors(include_url=False, include_input=False))
                raise ValueError(f"{self.path}: {problems}") from None
        return entries

    def reload(self) -> bool:
        """Read the keys file again; on any error log it and keep the current table."""
        try:
            pairs = _build(self._entries())
        except (OSError, ValueError) as e:
            log.error("keys file not reloaded, keeping the previous keys: %s", e)
            return False
        self._pairs = pairs  # one assignment: atomic for readers
        log.info("keys file reloaded: %d keys, tenants %s", len(pairs), sorted(self.names()))
        return True

    def lookup(self, key: str) -> Optional[Tenant]:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for candidate, tenant in self._pairs:  # every entry, so the time does not tell which one matched
            if hmac.compare_digest(candidate, digest):
                found = tenant
        return found

    def names(self) -> set[str]:
        return {tenant.name for _, tenant in self._pairs} | {DEFAULT}


def over_limit(message: str, param: Optional[str] = None, retry_after_s: str = LIMIT_RETRY_AFTER_S) -> APIError:
    return APIError(message, 429, param, headers={"Retry-After": retry_after_s})


class Slot:
    """One request in flight for a tenant: released once, when its `with` block ends or, for a
    streamed response, when the stream does."""

    def __init__(self, release: Callable[[], None]):
        self._release: Optional[Callable[[], None]] = release
        self._streaming = False

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        if not self._streaming:
            self.release()

    def stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """`events`, holding the slot until they end. A stream the server never starts (client
        gone before the first byte) runs no `finally`, so it is also released when collected."""
        self._streaming = True

        async def held() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                self.release()

        wrapped = held()
        weakref.finalize(wrapped, self.release)
        return wrapped


class InFlight:
    """Requests in flight per tenant (generation and document analysis) against its limit."""

    def __init__(self, on_limited: Callable[[str], None] = lambda tenant: None):
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # a Slot may be released by the garbage collector on any thread
        self._on_limited = on_limited

    def slot(self, tenant: Tenant) -> Slot:
        """A slot for one request; APIError 429 when the tenant has all its requests running."""
        limit = tenant.limits.max_requests_in_flight
        with self._lock:
            n = self._counts.get(tenant.name, 0)
            if limit is not None and n >= limit:
                refused = True
            else:
                refused = False
                self._counts[tenant.name] = n + 1
        if refused:
            self._on_limited(tenant.name)
            raise over_limit(f"tenant {tenant.name} has {limit} requests in flight (its limit); retry shortly")
        return Slot(lambda: self._done(tenant.name))

    def _done(self, name: str) -> None:
        with self._lock:
            self._counts[name] -= 1


# --- `cacheblend keys hash` ---------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="API keys for the keys file")
    p.add_argument("action", choices=["hash"], help="hash: print the sha256 of the key read from stdin")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().rstrip("\r\n")  # one line: `echo KEY | cacheblend keys hash` works
    if not key:
        print("no key on stdin", file=sys.stderr)
        return 2
    print(json.dumps({"key_sha256": hash_key(key)}))
    return 0
