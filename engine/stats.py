"""RequestStats: one request's record, read by attribute by the response, the metrics and the logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from engine.prefill import Prefilled
    from engine.request import Request

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
    prefill_paused_s: Optional[float] = None  # TTFT spent decoding other streams between this prefill's layers
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
                 "queue_s", "kv_fetch_s", "selection_s", "recompute_s", "first_decode_s", "prefill_paused_s", "ttft_s", "e2e_s")
        values = {n: getattr(self, n) for n in names}
        return " ".join(f"{n}={round(v, 4) if isinstance(v, float) else v}" for n, v in values.items() if v is not None)


def record_prefill(st: RequestStats, req: "Request", pre: "Prefilled", first_decode_s: float, ttft_s: float) -> None:
    """What a finished prefill tells about a request: its mode, tokens by source, phases, TTFT."""
    st.mode = req.mode
    st.ratio = req.spec.ratio
    for name, value in prefill_record(pre).items():
        setattr(st, name, value)
    st.first_decode_s = first_decode_s
    st.ttft_s = ttft_s


def prefill_record(pre: "Prefilled") -> dict:
    """The RequestStats fields a prefill fills (plain values: the vLLM connector sends them
    from its worker to the server in the request's output)."""
    ps = pre.result.stats
    return {
        "tokens_reused": ps.num_tokens - ps.recomputed_tokens, "tokens_recomputed": ps.recomputed_tokens,
        "exact_tokens": ps.exact_tokens, "chunk_tokens": ps.cached_tokens - pre.turn_tokens,
        "turn_tokens": pre.turn_tokens, "recomputed_per_layer": list(ps.computed_per_layer),
        "selected_per_check_layer": {layer: len(p) for layer, p in ps.selected.items()},
        "chunk_hits": dict(pre.chunk_tiers), "chunk_misses": pre.chunk_misses,
        "kv_fetch_s": pre.kv_fetch_s, "chunk_compute_s": pre.chunk_compute_s, "kv_load_s": pre.kv_load_s,
        "kv_wait_s": pre.kv_wait_s, "loading_hidden": pre.kv_wait_s <= 0.1 * max(pre.kv_load_s, 1e-9),
        "selection_s": ps.selection_s, "recompute_s": ps.compute_s - ps.selection_s, "prefill_paused_s": ps.paused_s,
    }
