"""The engine: request -> segments -> token IDs -> KV fetch -> blend prefill -> decode -> output.

`make_request` resolves a request once (length, blend spec). `step()` does one unit of work as
the scheduler decides: one decode step for the running batch, and a slice of the prefill in
progress (`max_num_batched_tokens` computed tokens: whole layers or rows of one; fewer, so the
step lasts at most `max_itl_slowdown` decode steps; all of it when nobody is decoding), whose
first token is sampled as soon as it ends; when idle, one step of a quality re-run. So a
stream's next token never waits for a whole prefill of another request. Requests join and
leave the decode batch between steps (continuous batching). The engine is driven by one thread;
`add_request` and `abort` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import deque
from typing import Optional, Sequence as Seq

import torch

from config.settings import Settings
from engine import native
from engine.steps import run_for, run_to_end
from engine.chunks import Precompute
from engine.decode import decode_step
from engine.detok import Detokenizer
from engine.loader import load_model
from engine.model import Transformer
from engine.prefill import Prefilled, Prefiller
from engine.prefix_cache import PrefixCache
from engine.prompt import chat_segments, completion_segments, turn_ids
from engine.quality_runs import QualityJob, QualityMonitor
from engine.request import BlendParams, Request, RequestOutput
from engine.resolve import resolve_blend, resolve_request
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import Scheduler, prefill_budget
from engine.segments import Segment
from engine.sequence import Sequence
from engine.stats import RequestStats, record_prefill
from engine.turns import TurnKeeper
from kvstore import build_store
from kvstore.base import ChunkStore

log = logging.getLogger(__name__)

DECODE_DECAY = 0.7    # weight of the past in a decode step's usual cost
ROW_COST_PIECES = 16  # prefill pieces whose cost per computed token is remembered


class LLMEngine:
    def __init__(self, settings: Settings, store: Optional[ChunkStore] = None, model: Optional[Transformer] = None, tokenizer=None):
        self.settings = settings
        if model is None:
            model, tokenizer, self.model_name = load_model(settings)
        else:
            self.model_name = settings.served_model_name or getattr(model.hf_config, "_name_or_path", "") or "model"
        self.model, self.tokenizer = model, tokenizer
        if model.device.type == "cpu":
            native.append_attend_op()  # build or load the decode kernel now, not in a request's first decode
        self.device = model.device
        cfg = model.cfg
        limits = [settings.max_model_len, cfg.max_position_embeddings] + ([cfg.sliding_window] if cfg.sliding_window else [])
        self.max_model_len = min(limits)  # sliding-window attention is not implemented: stay inside the window
        self.eos_ids = _eos_ids(model, tokenizer)
        self.store: ChunkStore = store if store is not None else build_store(settings, model.device)
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes)
        self.prefiller = Prefiller(model, tokenizer, self.store, Precompute.for_settings(tokenizer, settings),
                                   self.prefix_cache, settings.recompute_chunk_head, settings.turn_reuse)
        self.turns = TurnKeeper(model, tokenizer, self.store, self.prefiller.turn_key) if settings.turn_reuse else None
        self.quality = QualityMonitor(settings, self.prefiller, self.eos_ids)
        self.scheduler: Scheduler[Sequence] = Scheduler(settings.max_num_seqs, settings.max_queue)
        # seconds per computed token of the last prefill pieces; the dearest sizes the next, as a
        # cheap kind (a check layer's projections: 10 us a row, against 180 us for whole rows)
        # would otherwise buy a piece of dear rows 10x too long
        self._row_costs: deque[float] = deque(maxlen=ROW_COST_PIECES)
        self._decode_s: Optional[float] = None  # seconds per decode step (moving average; follows drops at once)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def recompute_ratio(self) -> float:
        """The default ratio now (the quality controller may move it)."""
        return self.quality.ratio

    # --- request -> segments -> resolved request ---------------------------------------------

    # `salt` (a tenant's, or a request's cache_salt; empty: none) goes into chunk and turn keys.

    def chunk_segment(self, token_ids: Seq[int], salt: str = "") -> Segment:
        return self.prefiller.chunk_segment(token_ids, salt)

    def chunk_from_text(self, text: str, salt: str = "") -> Segment:
        return self.prefiller.chunk_from_text(text, salt)

    def chat_segments(self, messages: list[dict], chunks: list[Segment], salt: str = "") -> list[Segment]:
        turn_key = functools.partial(self.prefiller.turn_key, salt=salt)
        return chat_segments(self.tokenizer, messages, chunks, self.settings.chat_preamble, turn_key)

    def user_turn(self, messages: list[dict]) -> tuple[int, ...]:
        """The last user message as a turn, to keep after the prefill: only inside a conversation
        (single-shot requests would fill the store with turns nobody sends back)."""
        if self.turns is None or sum(m["role"] != "system" for m in messages) < 2:
            return ()
        return turn_ids(self.tokenizer, messages[-1]) or ()

    def completion_segments(self, prompt: str, chunks: list[Segment]) -> list[Segment]:
        return completion_segments(self.tokenizer, prompt, chunks, self.settings.completion_prefix)

    def make_request(self, request_id: str, segments: Seq[Segment], sampling: SamplingParams = SamplingParams(),
                     blend: BlendParams = BlendParams(), input_param: str = "messages", user_turn: tuple[int, ...] = (),
                     salt: str = "", tenant: str = "default") -> Request:
        """The request resolved once: max_tokens against the context (None: up to the limit)
        and the blend spec from `blend` over the settings. RequestError names the bad field.
        `user_turn` (from `user_turn`): kept with the reply for the conversation's next request.
        `salt`: the one its segments were keyed with (its prefix-cache entries and turns get it)."""
        return resolve_request(request_id, segments, sampling, blend, self.settings, self.model.cfg.num_layers,
                               self.recompute_ratio, self.max_model_len, input_param, user_turn, salt, tenant)

    # --- scheduling -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a resolved request; raises QueueFull when the waiting queue is full."""
        seq = Sequence(request, Sampler(request.sampling, self.settings.seed),
                       Detokenizer(self.tokenizer, request.sampling.stop), RequestStats(prompt_tokens=request.num_prompt_tokens))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.quality.has_work()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._finish(seq, "abort") for seq in sched.aborted]
        budget = None  # nobody decoding: the prefill runs to its end
        if sched.decode:
            t0 = time.perf_counter()
            outputs += self._decode(sched.decode)
            decode_s = time.perf_counter() - t0
            # the usual decode step, unless this one was faster: a hiccup must not buy a longer piece
            usual = decode_s if self._decode_s is None else DECODE_DECAY * self._decode_s + (1 - DECODE_DECAY) * decode_s
            self._decode_s = min(decode_s, usual)
            budget = prefill_budget(self.settings.max_num_batched_tokens, len(sched.decode), self._decode_s,
                                    max(self._row_costs, default=None), self.settings.max_itl_slowdown)
        if sched.prefill is not None:
            out = self._advance_prefill(sched.prefill, budget)
            if out is not None:
                outputs.append(out)
        elif sched.idle and self.quality.has_work():
            self.quality.step()
        return outputs

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every queued and running request with an error (after a failed decode step)."""
        return [self._finish(seq, "error", error=error) for seq in self.scheduler.drain()]

    # --- prefill, decode, finish ------------------------------------------------------------

    def _advance_prefill(self, seq: Sequence, budget: Optional[int]) -> Optional[RequestOutput]:
        """Run `seq`'s prefill (started on its first call) for `budget` computed tokens (None: to
        its end); its first token's output once it ends."""
        req, st = seq.request, seq.stats
        fresh = seq.prefill is None  # its first call also looks up, allocates and computes missed chunks
        if fresh:
            st.queue_s = time.perf_counter() - req.arrival_time
            seq.prefill = self.prefiller.steps(req.segments, req.mode, req.spec,
                                               req.num_prompt_tokens + req.sampling.max_tokens, remember=False, salt=req.salt)
        try:
            if budget is None:
                pre = run_to_end(seq.prefill)
            else:
                t0 = time.perf_counter()
                pre, rows = run_for(seq.prefill, budget)
                if rows and not fresh:  # what a computed token costs now (prompt length and mode move it)
                    self._row_costs.append((time.perf_counter() - t0) / rows)
            if pre is None:
                return None  # the streams decode, then it goes on
            seq.prefill = None
            t0 = time.perf_counter()
            token = seq.sampler(pre.result.logits)
        except Exception as e:  # one bad request must never take the engine (or other requests) down
            log.exception("prefill failed for %s", req.request_id)
            return self._finish(seq, "error", error=str(e))
        now = time.perf_counter()
        self.scheduler.prefilled(seq)
        seq.cache = pre.result.cache
        if self.quality.wants(req.mode):
            seq.quality_logits = pre.result.logits.clone()
        self.prefiller.remember_prefix(req.segments, pre, req.salt)
        if self.turns is not None:
            self._keep(lambda: self.turns.keep_prompt(req.segments, pre.computed_turns, seq.cache, req.user_turn, req.salt))
        record_prefill(st, req, pre, first_decode_s=now - t0, ttft_s=now - req.arrival_time)
        out = seq.append(token, self.eos_ids)
        if not out.finished:
            out.stats = dataclasses.replace(st, itl_s=[])  # a snapshot: TTFT and its phases
        return self._after(seq, out)

    def _decode(self, seqs: list[Sequence]) -> list[RequestOutput]:
        logits = decode_step(self.model, [s.cache for s in seqs], [s.output_ids[-1] for s in seqs])
        outputs = []
        for seq, row in zip(seqs, logits):
            try:
                token = seq.sampler(row)
            except Exception as e:  # this request's sampling failed: only it ends
                log.exception("sampling failed for %s", seq.request_id)
                outputs.append(self._finish(seq, "error", error=str(e)))
                continue
            outputs.append(self._after(seq, seq.append(token, self.eos_ids)))
        return outputs

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> RequestOutput:
        return self._after(seq, seq.finish(reason, error=error))

    def _after(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        """Post-process one output: a finished request leaves the batch (and may be queued for
        a quality re-run)."""
        if not out.finished:
            return out
        if seq.prefill is not None:  # aborted or failed mid-prefill
            seq.prefill.close()  # releases its chunk loader
            seq.prefill = None
        if req_keeps_reply(seq, out, self.eos_ids):
            self._keep(lambda: self.turns.keep_reply(seq.request.token_ids, seq.output_ids, seq.cache, seq.request.salt))
        seq.cache = None  # frees the fused KV
        self.scheduler.finish(seq)
        if seq.quality_logits is not None and out.finish_reason in ("stop", "length"):
            greedy = seq.output_ids[: self.quality.compare_tokens] if seq.request.sampling.greedy else None
            self.quality.submit(QualityJob(seq.request, seq.stats.ratio, seq.quality_logits, greedy))
        tenant = seq.request.tenant
        log.debug("finished %s (tenant %s): %s", seq.request_id, tenant, seq.stats.breakdown(),
                  extra={"request_id": seq.request_id, "tenant": tenant})
        return out

    def _keep(self, keep) -> None:
        """Keeping turn KV is an optimisation: a failure is logged, never the request's."""
        try:
            keep()
        except Exception:
            log.exception("could not keep turn KV")

    # --- direct use (benchmarks, evaluation, tests) -----------------------------------------

    def prefill(self, segments: Seq[Segment], blend: BlendParams = BlendParams(), capacity: int = 0, remember: bool = True,
                token_scores: Optional[torch.Tensor] = None) -> Prefilled:
        """One prefill on the calling thread, outside the scheduler. `token_scores` [N]: rank
        the check layer's candidates by these instead of the KV deviation (research)."""
        mode, spec = resolve_blend(blend, self.settings, self.model.cfg.num_layers, self.recompute_ratio)
        return run_to_end(self.prefiller.steps(segments, mode, spec, capacity, remember, token_scores))

    def ensure_chunk(self, segment: Segment):
        """The chunk's KV from the store, precomputed and stored on a miss (the warm-up path)."""
        return self.prefiller.ensure_chunk(segment)

    def warm_prefix(self, segments: Seq[Segment]) -> None:
        """Prefix-cache the prompt's prefix segment alone, as earlier requests with the same
        system prompt and instruction would have (benchmarks start every mode this way)."""
        if segments and segments[0].kind == "prefix":
            self.prefill([segments[0], Segment("suffix", segments[-1].token_ids[-1:])], BlendParams(mode="prefix_cache"))

    def generate(self, requests: list[Request]) -> dict[str, dict]:
        """Run requests to completion on the calling thread; request_id -> {text, token_ids, stats, ...}."""
        results = {r.request_id: {"text": "", "token_ids": [], "stats": None, "finish_reason": None, "error": None}
                   for r in requests}
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


def req_keeps_reply(seq: Sequence, out: RequestOutput, eos_ids: set[int]) -> bool:
    """A conversation's reply that ended in EOS (so its rendering as a turn is known) is kept."""
    return (bool(seq.request.user_turn) and out.finish_reason == "stop" and seq.cache is not None
            and bool(seq.output_ids) and seq.output_ids[-1] in eos_ids)


def _eos_ids(model: Transformer, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, getattr(model.hf_config, "eos_token_id", None), gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    return ids
