"""The engine: request -> segments -> token IDs -> KV fetch -> blend prefill -> decode -> output.

`step()` does one unit of work: prefill the next waiting request (its first token is sampled
right away, so TTFT is one prefill), or else one decode step for every running request.
Requests join and leave the decode batch between steps (continuous batching). The engine is
driven by one thread; `add_request` and `abort` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

import torch

from config.settings import MODES, SELECTION_SIGNALS, Settings
from engine.blend import BlendSpec, KVCache, PrefillInput, PrefillResult, blend_prefill_steps, run_to_end
from engine.chunks import PROBE_TEXT, Precompute, key_for, precompute_chunk, sink_token_id
from engine.decode import decode_step
from engine.detok import Detokenizer
from engine.loader import EMBEDDED_ALIASES, EMBEDDED_NAME, resolve_model_dir
from engine.model import Transformer
from engine.prefix_cache import PrefixCache
from engine.prompt import chat_segments, completion_segments, default_prefix_ids
from engine.quality import QualitySample, QualitySampler, RatioController, first_token_kl, token_f1
from engine.request import BlendParams, Request, RequestOutput
from engine.sampling import Sampler
from engine.segments import Segment, spans, token_ids, tokenize
from kvstore import ChunkMissing, LayerPrefetcher, build_store
from kvstore.base import ChunkKV, ChunkStore

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as given (reported to the client, never fatal)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # fp32 is faster on CPU
    return getattr(torch, name)


@dataclass
class Prefilled:
    """A prefill's result plus what the engine adds around it."""
    result: PrefillResult
    mode: str
    ratio: Optional[float]  # the last check layer's ratio (cacheblend only)
    chunk_tiers: dict[str, int]  # tier -> chunks served from it ("computed": missed everywhere)
    chunk_misses: int
    load: dict[str, float]       # chunk_compute_s, kv_load_s (loader busy), kv_wait_s (compute blocked)

    @property
    def kv_fetch_s(self) -> float:
        """TTFT spent getting chunk KV: computing misses plus waiting on loads."""
        return self.load["chunk_compute_s"] + self.load["kv_wait_s"]


@dataclass
class _Sequence:
    request: Request
    sampler: Sampler
    detok: Detokenizer
    cache: Optional[KVCache] = None
    output_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    itl: list[float] = field(default_factory=list)
    shadow_logits: Optional[torch.Tensor] = None  # first-token logits kept for a quality sample


@dataclass
class _ShadowJob:
    """A finished request to re-run with full_prefill when the engine is idle."""
    request: Request
    mode: str
    ratio: Optional[float]
    served_logits: torch.Tensor        # [V]
    served_greedy: Optional[list[int]]  # the served answer's first tokens, if it was greedy


class LLMEngine:
    def __init__(self, settings: Settings, store: Optional[ChunkStore] = None, model: Optional[Transformer] = None, tokenizer=None):
        self.settings = settings
        self.device = resolve_device(settings.device)
        if model is None:
            from transformers import AutoTokenizer

            model_dir = resolve_model_dir(settings.model, settings.data_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            model = Transformer.from_dir(model_dir, self.device, resolve_dtype(settings.dtype, self.device))
            default_name = EMBEDDED_NAME if settings.model in EMBEDDED_ALIASES else model_dir.name
        else:
            default_name = getattr(model.hf_config, "_name_or_path", "") or "model"
        self.model, self.tokenizer = model, tokenizer
        self.model_name = settings.served_model_name or default_name
        cfg = model.cfg
        limits = [settings.max_model_len, cfg.max_position_embeddings] + ([cfg.sliding_window] if cfg.sliding_window else [])
        self.max_model_len = min(limits)  # sliding-window attention is not implemented: stay inside the window
        self.eos_ids = _eos_ids(model, tokenizer)
        # the probe (a second precompute pass) only when the server's signal reads its result
        probe = tuple(tokenizer.encode(PROBE_TEXT, add_special_tokens=False)) if settings.selection_signal == "sensitivity" else ()
        if settings.chunk_context == "sink":
            self.precompute = Precompute("sink", (sink_token_id(tokenizer),), probe)
        else:
            self.precompute = Precompute("prefix", default_prefix_ids(tokenizer, settings.chat_preamble), probe)
        self.kv_dtype = str(model.dtype).removeprefix("torch.")
        self.store: ChunkStore = store if store is not None else build_store(settings, model.device)
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes)
        self.controller = RatioController(settings.recompute_ratio, settings.controller_min_ratio, settings.controller_max_ratio,
                                          settings.controller_target_agreement, settings.controller_step,
                                          settings.controller_window, settings.controller_hysteresis) if settings.controller_enabled else None
        self.recompute_ratio = self.controller.ratio if self.controller else settings.recompute_ratio
        self._sample_quality = QualitySampler(settings.quality_sample_rate, settings.seed)
        self.shadow_jobs: deque[_ShadowJob] = deque()
        self._shadow: Optional[Generator[None, None, None]] = None  # the quality re-run in progress
        self.on_quality: list[Callable[[QualitySample], None]] = []      # e.g. metrics
        self.on_controller: list[Callable[[str, float], None]] = []      # (decision, new ratio)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    # --- prompt building -------------------------------------------------------------------

    def chunk_segment(self, token_ids: tuple[int, ...]) -> Segment:
        return Segment("chunk", tuple(token_ids), key_for(self.model, self.precompute, tuple(token_ids), self.kv_dtype))

    def chunk_from_text(self, text: str) -> Segment:
        return self.chunk_segment(tokenize(self.tokenizer, text))

    def chat_segments(self, messages: list[dict], chunks: list[Segment]) -> list[Segment]:
        return chat_segments(self.tokenizer, messages, chunks, self.settings.chat_preamble)

    def completion_segments(self, prompt: str, chunks: list[Segment]) -> list[Segment]:
        return completion_segments(self.tokenizer, prompt, chunks, self.settings.completion_prefix)

    # --- chunk KV -------------------------------------------------------------------------

    def compute_chunk_kv(self, segment: Segment) -> ChunkKV:
        return precompute_chunk(self.model, self.precompute, segment.token_ids)

    def ensure_chunk(self, segment: Segment) -> ChunkKV:
        """The chunk's KV from the store, precomputed and stored on a miss (warm-up path)."""
        return self.store.get_or_compute(segment.chunk_key, lambda: self.compute_chunk_kv(segment))

    # --- prefill --------------------------------------------------------------------------

    def blend_spec(self, blend: BlendParams) -> tuple[str, BlendSpec]:
        s = self.settings
        mode = blend.mode or s.mode
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; one of {', '.join(MODES)}", "cacheblend.mode")
        if mode != "cacheblend":
            return mode, BlendSpec()
        layers = blend.check_layers if blend.check_layers is not None else s.check_layers
        if blend.check_ratios is not None:
            ratios = blend.check_ratios
        elif blend.recompute_ratio is not None or blend.check_layers is not None:
            ratios = [blend.recompute_ratio if blend.recompute_ratio is not None else self.recompute_ratio] * len(layers)
        elif s.check_ratios is not None:
            ratios = s.check_ratios
        else:
            ratios = [self.recompute_ratio] * len(layers)
        L = self.model.cfg.num_layers
        if not layers or sorted(set(layers)) != list(layers) or not all(0 <= x < L for x in layers):
            raise RequestError(f"check_layers must be increasing layer indices in [0, {L})", "cacheblend.check_layers")
        if len(ratios) != len(layers) or any(not 0 <= r <= 1 for r in ratios) or any(b > a for a, b in zip(ratios, ratios[1:])):
            raise RequestError("ratios must be in [0, 1], one per check layer, non-increasing", "cacheblend.recompute_ratio")
        signal = blend.selection_signal or s.selection_signal
        if signal not in SELECTION_SIGNALS:
            raise RequestError(f"selection_signal must be one of {', '.join(SELECTION_SIGNALS)}", "cacheblend.selection_signal")
        return mode, BlendSpec(list(layers), list(ratios), signal, s.sensitivity_pool)

    def prefill(self, segments: list[Segment], blend: BlendParams = BlendParams(), capacity: int = 0, remember: bool = True) -> Prefilled:
        """Fused KV cache and last-token logits for the prompt, in the requested mode.

        `remember`: put the exact leading segments into the prefix cache now (serving does it
        after the first token instead, so the copy is not part of TTFT).
        """
        return run_to_end(self.prefill_steps(segments, blend, capacity, remember))

    def prefill_steps(self, segments: list[Segment], blend: BlendParams, capacity: int, remember: bool = True) -> Generator[None, None, Prefilled]:
        """`prefill`, yielding after every layer."""
        mode, spec = self.blend_spec(blend)
        ids = token_ids(segments)
        N = len(ids)
        if N == 0:
            raise RequestError("the prompt is empty", "messages")
        dev = self.model.device
        seg_spans = spans(segments)

        exact_len, exact_kv = 0, None
        if mode != "full_prefill":
            exact_len, entry = self.prefix_cache.lookup(segments, N - 1)
            if entry is not None:
                exact_kv = (entry.k[:, :, :exact_len], entry.v[:, :, :exact_len])

        forced = torch.ones(N, dtype=torch.bool, device=dev)
        chunks = []  # (segment, span) of the chunks whose cached KV this prefill uses
        if mode in ("full_reuse", "cacheblend"):
            head = self.settings.recompute_chunk_head
            for seg, (s, e) in zip(segments, seg_spans):
                if seg.kind == "chunk" and s >= exact_len and s < e:
                    chunks.append((seg, (s, e)))
                    forced[min(s + head, e):e] = False  # chunk heads stay forced (their own sinks)
        forced[N - 1] = True

        t0 = time.perf_counter()
        computed = {seg.chunk_key for seg, _ in chunks if not self.store.contains(seg.chunk_key)}
        for seg, _ in chunks:
            if seg.chunk_key in computed:
                self.ensure_chunk(seg)  # a miss everywhere: precompute now, store for next time
        compute_s = time.perf_counter() - t0

        cache = KVCache.allocate(self.model, max(capacity, N))
        ids_t = torch.tensor(ids, device=dev)
        spans_ = [span for _, span in chunks]
        keys = [seg.chunk_key for seg, _ in chunks]
        loader = LayerPrefetcher(self.store, keys, self.model.cfg.num_layers) if chunks else None
        try:
            inp = PrefillInput(ids_t, forced, exact_len, exact_kv, spans_, loader.layer if loader else None,
                               chunk_sensitivity=loader.sensitivity if loader else None)
            result = yield from blend_prefill_steps(self.model, inp, spec, cache)
        except ChunkMissing as e:
            # evicted or found corrupt mid-stream: recompute from its tokens and use it from memory
            log.warning("chunk %s vanished during prefill; recomputing it", e.key)
            loader.close()
            kvs = [self.ensure_chunk(seg) for seg, _ in chunks]
            computed |= {e.key}
            loader = None
            inp = PrefillInput(ids_t, forced, exact_len, exact_kv, spans_,
                               lambda layer: [(kv.keys[layer], kv.values[layer]) for kv in kvs],
                               chunk_sensitivity=lambda: [kv.sensitivity for kv in kvs])
            result = yield from blend_prefill_steps(self.model, inp, spec, cache)
        finally:
            if loader is not None:
                loader.close()
        tiers: dict[str, int] = {}
        for key in keys:
            tier = "computed" if key in computed else (loader.tiers.get(key, "cpu") if loader else "cpu")
            tiers[tier] = tiers.get(tier, 0) + 1
        load = {
            "chunk_compute_s": compute_s,
            "kv_load_s": loader.total_load_seconds if loader else 0.0,
            "kv_wait_s": result.stats.kv_wait_s,
        }
        if remember:
            self.remember_prefix(segments, mode, cache)
        return Prefilled(result, mode, spec.ratios[-1] if spec.ratios else None, tiers, len(computed), load)

    def warm_prefix(self, segments: list[Segment]) -> None:
        """Prefix-cache the prompt's prefix segment alone, as earlier requests with the same
        system prompt and instruction would have (benchmarks start every mode this way)."""
        if segments and segments[0].kind == "prefix":
            self.prefill([segments[0], Segment("suffix", segments[-1].token_ids[-1:])], BlendParams(mode="prefix_cache"))

    def remember_prefix(self, segments: list[Segment], mode: str, cache: KVCache) -> None:
        """Keep the exact leading segments for later requests (full_prefill is the no-reuse baseline)."""
        if mode == "full_prefill":
            return
        if mode == "prefix_cache":
            exact = len(segments) - 1  # all but the suffix
        else:
            exact = next((i for i, s in enumerate(segments) if s.kind == "chunk"), len(segments) - 1)
        self.prefix_cache.insert(segments, exact, cache.k, cache.v)

    # --- scheduling -----------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        n = request.num_prompt_tokens
        if n == 0:
            raise RequestError("the prompt is empty", "messages")
        if n + request.sampling.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + request.sampling.max_tokens} tokens ({n} in the messages, {request.sampling.max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.", "max_tokens")
        self.blend_spec(request.blend)

    def add_request(self, request: Request) -> None:
        self.validate(request)
        seq = _Sequence(request, Sampler(request.sampling, self.settings.seed), Detokenizer(self.tokenizer, request.sampling.stop))
        with self._lock:
            self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted or self.shadow_jobs or self._shadow)

    def step(self) -> list[RequestOutput]:
        outputs = self._drop_aborted()
        with self._lock:
            seq = self.waiting.popleft() if self.waiting and len(self.running) < self.settings.max_num_seqs else None
        if seq is not None:
            outputs.append(self._prefill_one(seq))
        elif self.running:
            outputs += self._decode_running()
        elif self._shadow is not None or self.shadow_jobs:
            # low priority: one layer or decode step at a time, only while no request waits or runs
            if self._shadow is None:
                self._shadow = self._shadow_steps(self.shadow_jobs.popleft())
            try:
                next(self._shadow)
            except StopIteration:
                self._shadow = None
        return outputs

    def _drop_aborted(self) -> list[RequestOutput]:
        with self._lock:
            if not self._aborted:
                return []
            aborted, self._aborted = self._aborted, set()
            dropped = [s for s in list(self.waiting) + self.running if s.request.request_id in aborted]
            self.waiting = deque(s for s in self.waiting if s.request.request_id not in aborted)
        self.running = [s for s in self.running if s.request.request_id not in aborted]
        return [self._finish(s, "abort") for s in dropped]

    def _prefill_one(self, seq: _Sequence) -> RequestOutput:
        req = seq.request
        t_start = time.perf_counter()
        try:
            pre = self.prefill(req.segments, req.blend, req.num_prompt_tokens + req.sampling.max_tokens, remember=False)
        except Exception as e:  # a bad request must never take the engine down
            log.exception("prefill failed for %s", req.request_id)
            seq.stats = {"status": "error"}
            return self._finish(seq, "error", error=str(e))
        seq.cache = pre.result.cache
        if self._sample_quality(pre.mode):
            seq.shadow_logits = pre.result.logits.clone()
        t0 = time.perf_counter()
        token = seq.sampler(pre.result.logits)
        now = time.perf_counter()
        seq.first_token_time = seq.last_token_time = now
        self.remember_prefix(req.segments, pre.mode, pre.result.cache)
        st = pre.result.stats
        seq.stats = {
            "mode": pre.mode,
            "ratio": pre.ratio,
            "status": "ok",
            "prompt_tokens": st.num_tokens,
            "tokens_reused": st.num_tokens - st.recomputed_tokens,
            "tokens_recomputed": st.recomputed_tokens,
            "exact_tokens": st.exact_tokens,
            "chunk_tokens": st.cached_tokens,
            "recomputed_per_layer": st.computed_per_layer,
            "selected_per_check_layer": {layer: len(p) for layer, p in st.selected.items()},
            "chunk_hits": {t: n for t, n in pre.chunk_tiers.items() if t != "computed"},
            "chunk_misses": pre.chunk_misses,
            "queue_s": t_start - req.arrival_time,
            "kv_fetch_s": pre.kv_fetch_s,
            **pre.load,
            "loading_hidden": pre.load["kv_wait_s"] <= 0.1 * max(pre.load["kv_load_s"], 1e-9),
            "selection_s": st.selection_s,
            "recompute_s": st.compute_s - st.selection_s,
            "first_decode_s": now - t0,
            "ttft_s": now - req.arrival_time,
        }
        self.running.append(seq)
        out = self._append_token(seq, token)
        out.stats = dict(seq.stats)
        return out

    def _decode_running(self) -> list[RequestOutput]:
        seqs = list(self.running)
        logits = decode_step(self.model, [s.cache for s in seqs], [s.output_ids[-1] for s in seqs])
        outputs = []
        for seq, row in zip(seqs, logits):
            outputs.append(self._append_token(seq, seq.sampler(row)))
        return outputs

    def _append_token(self, seq: _Sequence, token: int) -> RequestOutput:
        now = time.perf_counter()
        if seq.output_ids:
            seq.itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output_ids.append(token)
        p = seq.request.sampling
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return self._finish(seq, "stop", last_token=token)
        text, stop_hit = seq.detok.add(token)
        if stop_hit is not None:
            return self._finish(seq, "stop", text=text, last_token=token)
        if len(seq.output_ids) >= p.max_tokens:
            return self._finish(seq, "length", text=text + seq.detok.flush(), last_token=token)
        return RequestOutput(seq.request.request_id, text, [token])

    def _finish(self, seq: _Sequence, reason: str, text: str = "", last_token: Optional[int] = None, error: Optional[str] = None) -> RequestOutput:
        if seq in self.running:
            self.running.remove(seq)
        seq.cache = None  # frees the fused KV
        now = time.perf_counter()
        if reason == "stop" and text == "" and last_token is not None:
            text = seq.detok.flush()
        if seq.shadow_logits is not None and reason in ("stop", "length"):
            p = seq.request.sampling
            greedy = seq.output_ids[: self.settings.quality_compare_tokens] if p.temperature == 0 else None
            self.shadow_jobs.append(_ShadowJob(seq.request, seq.stats["mode"], seq.stats["ratio"], seq.shadow_logits, greedy))
        stats = dict(seq.stats)
        stats.setdefault("status", "ok")
        if reason == "abort":
            stats["status"] = "aborted"
        stats.update({
            "finish_reason": reason,
            "completion_tokens": len(seq.output_ids),
            "e2e_s": now - seq.request.arrival_time,
            "decode_s": now - seq.first_token_time if seq.first_token_time else 0.0,
            "itl_s": seq.itl,
        })
        log.debug("finished %s: %s", seq.request.request_id, _breakdown(stats), extra={"request_id": seq.request.request_id})
        return RequestOutput(seq.request.request_id, text, [last_token] if last_token is not None else [], True, reason, error, stats)

    # --- quality sampling -----------------------------------------------------------------

    def _greedy_steps(self, pre: Prefilled, n: int) -> Generator[None, None, list[int]]:
        """Greedy-decode up to n tokens (stopping at EOS) from a prefill's fused cache."""
        tokens = [int(pre.result.logits.argmax())]
        while len(tokens) < n and tokens[-1] not in self.eos_ids:
            yield
            tokens.append(int(decode_step(self.model, [pre.result.cache], [tokens[-1]])[0].argmax()))
        return tokens

    def _shadow_steps(self, job: _ShadowJob) -> Generator[None, None, None]:
        n = self.settings.quality_compare_tokens
        req = job.request
        capacity = req.num_prompt_tokens + n
        full = yield from self.prefill_steps(req.segments, BlendParams(mode="full_prefill"), capacity)
        full_answer = yield from self._greedy_steps(full, n)
        served = job.served_greedy
        if served is None:  # a sampled answer says nothing about the cache: decode greedily in the served mode
            again = yield from self.prefill_steps(req.segments, req.blend, capacity)
            served = yield from self._greedy_steps(again, n)
        sample = QualitySample(req.request_id, job.mode, job.ratio, first_token_kl(full.result.logits, job.served_logits),
                               int(full.result.logits.argmax()) == int(job.served_logits.argmax()), token_f1(served, full_answer))
        for listener in self.on_quality:
            listener(sample)
        if self.controller is not None:
            decision = self.controller.observe(float(sample.top1_agree))
            if decision is not None:
                self.recompute_ratio = self.controller.ratio
                for listener in self.on_controller:
                    listener(decision, self.recompute_ratio)

    # --- convenience ----------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> dict[str, dict]:
        """Run requests to completion on the calling thread; request_id -> {text, token_ids, stats}."""
        results = {r.request_id: {"text": "", "token_ids": [], "stats": None, "finish_reason": None} for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_work():
            for out in self.step():
                res = results[out.request_id]
                res["text"] += out.text
                res["token_ids"] += out.token_ids
                if out.finished:
                    res["stats"], res["finish_reason"], res["error"] = out.stats, out.finish_reason, out.error
        return results


def _breakdown(stats: dict) -> str:
    """One line: TTFT and its phases, reuse, finish (for DEBUG logs)."""
    keys = ("mode", "ratio", "finish_reason", "prompt_tokens", "tokens_reused", "tokens_recomputed", "chunk_hits",
            "queue_s", "kv_fetch_s", "selection_s", "recompute_s", "first_decode_s", "ttft_s", "e2e_s")
    return " ".join(f"{k}={round(stats[k], 4) if isinstance(stats.get(k), float) else stats.get(k)}" for k in keys if k in stats)


def _eos_ids(model: Transformer, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, getattr(model.hf_config, "eos_token_id", None), gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    return ids
