"""What the fault suite measures a server with: one request's outcome, a fault's tally, and
small probes (metrics, health, process memory).

A request ends in one of four ways: completed (answered in full, and with the expected answer
when one is known), refused (a clean error the fault may cost: a 4xx, or 503/429 under a limit),
failed (a wrong answer, a 5xx, an error event in a stream) or lost (no answer: the connection
dropped, it timed out, or a stream ended without `[DONE]`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

REFUSALS = frozenset({400, 404, 413, 429, 503})


@dataclass
class Outcome:
    """One request as the client saw it."""
    status: Optional[int]        # None: no HTTP answer at all
    text: str = ""
    done: bool = False           # a stream ended with [DONE] (a plain answer: read in full)
    error: Optional[str] = None  # an error event, an error body, or why there was no answer
    error_event: bool = False    # the stream itself reported an error
    latency_s: float = 0.0
    info: Optional[dict] = None  # the response's `cacheblend` object


@dataclass
class Tally:
    """One fault's counts; `ok` when it cost nothing it should not have and every check held."""
    name: str
    sent: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    lost: int = 0
    faults_injected: int = 0
    faults_survived: int = 0
    bytes_leaked: Optional[int] = None
    max_latency_s: Optional[float] = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: Optional[str] = None
    wall_s: float = 0.0
    details: list = field(default_factory=list)  # per-case rows, where a fault has cases

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.failed == 0 and self.lost == 0 and all(self.checks.values())

    def note(self, text: str) -> None:
        if len(self.notes) < 20:  # enough to see what went wrong, bounded for the JSON
            self.notes.append(text)

    def check(self, name: str, held: bool, detail: str = "") -> bool:
        self.checks[name] = self.checks.get(name, True) and bool(held)
        if not held:
            self.note(f"check {name} failed{': ' + detail if detail else ''}")
        return held

    def count(self, o: Outcome, expected: Optional[str] = None, refusals: frozenset = REFUSALS) -> str:
        """File one request under completed / refused / failed / lost; returns which."""
        self.sent += 1
        self.max_latency_s = max(self.max_latency_s or 0.0, o.latency_s)
        if o.status is None or (o.status == 200 and not o.done and not o.error_event):
            kind = "lost"  # no answer, or a stream cut short (a timeout included)
        elif o.status == 200 and o.error is None and (expected is None or o.text == expected):
            kind = "completed"
        elif o.status in refusals:
            kind = "refused"
        else:
            kind = "failed"
        setattr(self, kind, getattr(self, kind) + 1)
        if kind in ("failed", "lost"):
            wrong = o.status == 200 and o.error is None and o.text != expected
            self.note(f"{kind}: status {o.status} " + (f"answer {o.text!r} != {expected!r}" if wrong else f"{o.error}"))
        return kind

    def survived(self, injected: int, held: bool) -> None:
        self.faults_injected += injected
        self.faults_survived += injected if held else 0

    def report(self) -> dict:
        out = {k: v for k, v in vars(self).items()}
        out["ok"] = self.ok
        return out


async def stream_chat(client: httpx.AsyncClient, body: dict, timeout_s: float) -> Outcome:
    """POST a streaming chat request and read it to the end."""
    start = time.perf_counter()
    o = Outcome(None)
    try:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                                 timeout=timeout_s) as response:
            o.status = response.status_code
            if response.status_code != 200:
                o.error = (await response.aread()).decode(errors="replace")[:300]
            else:
                await _read_events(response, o)
    except httpx.HTTPError as e:
        o.error = f"{type(e).__name__}: {e}"
    o.latency_s = time.perf_counter() - start
    return o


async def _read_events(response: httpx.Response, o: Outcome) -> None:
    parts = []
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            o.done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if "error" in event:
                o.error, o.error_event = event["error"]["message"], True
            elif event.get("choices"):
                parts.append(event["choices"][0]["delta"].get("content") or "")
            o.info = event.get("cacheblend") or o.info
    o.text = "".join(parts)


async def post(client: httpx.AsyncClient, path: str, body: dict, timeout_s: float) -> tuple[Outcome, dict]:
    """A plain (non-streaming) POST; the outcome and the JSON answer ({} if none)."""
    start = time.perf_counter()
    try:
        response = await client.post(path, json=body, timeout=timeout_s)
    except httpx.HTTPError as e:
        return Outcome(None, error=f"{type(e).__name__}: {e}", latency_s=time.perf_counter() - start), {}
    try:
        data = response.json()
    except ValueError:
        data = {}
    ok = response.status_code == 200
    error = None if ok else str(data.get("error", {}).get("message") if isinstance(data, dict) else data)[:300]
    return Outcome(response.status_code, done=True, error=error, latency_s=time.perf_counter() - start), data


async def register_texts(client: httpx.AsyncClient, texts: list[str], timeout_s: float, tally: Tally) -> list[str]:
    """Register `texts` through POST /v1/chunks (counted in `tally`); their IDs ([] if refused)."""
    o, data = await post(client, "/v1/chunks", {"texts": texts}, timeout_s)
    tally.count(o)
    return [c["id"] for c in data.get("data", [])] if o.status == 200 else []


def metric(base_url: str, name: str, headers: Optional[dict] = None, **labels: str) -> float:
    """The sum of the samples of `name` (e.g. "cacheblend:kv_hits_total") whose labels match."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def idle(base_url: str, timeout_s: float = 30.0) -> bool:
    """Wait until the server reports no request running or waiting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(f"{base_url}/health", timeout=10).json()
        if health["num_running"] == 0 and health["num_waiting"] == 0:
            return True
        time.sleep(0.1)
    return False


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid`."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
