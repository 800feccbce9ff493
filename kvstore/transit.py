"""Writes on their way into a tier: the store serves them as if they had landed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from kvstore.tier_base import Payload


@dataclass(eq=False)
class Write:
    """A write of `payload` into the tier at index `tier`."""

    tier: int
    payload: Payload
    if_absent: bool          # a demotion: skip it if the tier already holds the key
    cancelled: bool = False  # the key was deleted: don't write, and undo the write if it landed
    started: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class Transit:
    """The writes not landed yet, by key. Thread-safe; takes no other lock while holding its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: dict[str, list[Write]] = {}

    def add(self, tier: int, payload: Payload, if_absent: bool = False) -> Write:
        w = Write(tier, payload, if_absent)
        with self._lock:
            self._writes.setdefault(payload.key, []).append(w)
        return w

    def find(self, tier: int, key: str) -> Optional[Write]:
        """The latest write of `key` into `tier` not landed yet."""
        with self._lock:
            return next((w for w in reversed(self._writes.get(key, ())) if w.tier == tier), None)

    def start(self, w: Write) -> bool:
        """Mark `w` as being written; False if it was cancelled (then skip it)."""
        with self._lock:
            w.started = not w.cancelled
            return w.started

    def done(self, w: Write) -> bool:
        """Forget `w`, which landed, failed or was skipped; True if it was cancelled meanwhile."""
        with self._lock:
            writes = self._writes.get(w.payload.key, [])
            if w in writes:
                writes.remove(w)
                if not writes:
                    del self._writes[w.payload.key]
        w.finished.set()
        return w.cancelled

    def cancel(self, key: str) -> bool:
        """Cancel every pending write of `key` and wait for those already under way to undo
        themselves; True if there was one."""
        with self._lock:
            writes = self._writes.pop(key, [])
            for w in writes:
                w.cancelled = True
        for w in writes:
            if w.started:
                w.finished.wait()
        return bool(writes)
