"""RequestStats: one request's record, read by attribute by the response, the metrics and the logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# status: ok | error | aborted | rejected (refused before the engine took it)
STATUSES = ("ok", "error", "aborted", "rejected")


@dataclass
class RequestStats:
    status: str = "ok"
    mode: Optional[str] = None              # None: refused or failed before a prefill ran
    ratio: Optional[float] = None           # the last check layer's ratio (cacheblend only)
    finish_reason: Optional[str] = None
    # --- tokens ---
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_reused: int = 0                  # prompt tokens whose final-layer KV was not computed
    tokens_recomputed: int = 0
    exact_tokens: int = 0                   # from the prefix cache
    chunk_tokens: int = 0                   # from stored chunk KV (before any recompute)
    turn_tokens: int = 0                    # from the stored KV of earlier turns (before any recompute)
    recomputed_per_layer: list[int] = field(default_factory=list)
    selected_per_check_layer: dict[int, int] = field(default_factory=dict)
    chunk_hits: dict[str, int] = field(default_factory=dict)  # tier -> chunks read from it
    chunk_misses: int = 0                   # chunks computed at request time
    # --- TTFT and its phases, seconds ---
    queue_s: Optional[float] = None
    kv_fetch_s: Optional[float] = None      # chunk_compute_s + kv_wait_s
    chunk_compute_s: Optional[float] = None
    kv_load_s: Optional[float] = None       # loader busy (overlapped with compute)
    kv_wait_s: Optional[float] = None       # compute blocked on the loader
    loading_hidden: Optional[bool] = None
    selection_s: Optional[float] = None
    recompute_s: Optional[float] = None
    first_decode_s: Optional[float] = None
    ttft_s: Optional[float] = None
    # --- after the first token ---
    decode_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)  # inter-token gaps

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown request status {self.status!r}")

    def breakdown(self) -> str:
        """One line for DEBUG logs: TTFT and its phases, reuse, finish."""
        names = ("mode", "ratio", "finish_reason", "prompt_tokens", "tokens_reused", "tokens_recomputed", "chunk_hits",
                 "queue_s", "kv_fetch_s", "selection_s", "recompute_s", "first_decode_s", "ttft_s", "e2e_s")
        values = {n: getattr(self, n) for n in names}
        return " ".join(f"{n}={round(v, 4) if isinstance(v, float) else v}" for n, v in values.items() if v is not None)
