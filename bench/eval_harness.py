"""The eval harness: the engines, one timed measurement, and the per-question loop.

Prefix-cache policy. The prefix cache is cleared before every measured prefill, so no mode
profits from an exact prefix another mode or question left behind; every mode starts cold
except chunk KV. The one exception is `prefix_cache` itself, whose point is reusing a prefix:
it gets the instruction prefix (chat template head + instruction, the only prefix MuSiQue
prompts share, as their passages differ) warmed by an earlier, untimed request, as vLLM's
automatic prefix caching would have it. `warm=True` warms that prefix for full_reuse and
cacheblend as well (what a server sees after its first request).

TTFT = the engine's prefill (chunk KV fetch from the store, selection, recompute, and the
engine's prefix-cache bookkeeping) plus sampling the first token, timed in-process; chunk
precompute and prefix warm-up are not timed.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from bench import dataset as ds
from bench.eval_metrics import compare
from bench.stats import mean
from config import load_settings
from config.settings import Settings
from engine.steps import run_to_end
from engine.decode import greedy_steps
from engine.llm_engine import LLMEngine
from engine.quality import first_token_kl
from engine.request import BlendParams
from engine.segments import Segment


@dataclass(frozen=True)
class ModeSpec:
    """One way of prefilling a prompt: a mode, its blend parameters, and which engine runs it."""
    label: str
    mode: str
    ratio: Optional[float] = None
    check_layers: Optional[tuple[int, ...]] = None
    check_ratios: Optional[tuple[float, ...]] = None
    selection_signal: Optional[str] = None
    engine: str = "default"  # key into Harness.engines

    def blend(self) -> BlendParams:
        if self.mode != "cacheblend":
            return BlendParams(mode=self.mode)
        return BlendParams(mode="cacheblend", recompute_ratio=self.ratio,
                           check_layers=list(self.check_layers) if self.check_layers is not None else None,
                           check_ratios=list(self.check_ratios) if self.check_ratios is not None else None,
                           selection_signal=self.selection_signal)

    @property
    def identity(self) -> tuple:
        return (self.engine, self.mode, self.ratio, self.check_layers, self.check_ratios, self.selection_signal)


def base_spec(mode: str, engine: str = "default") -> ModeSpec:
    return ModeSpec(mode if engine == "default" else f"{engine}/{mode}", mode, engine=engine)


def cacheblend_spec(ratio: float) -> ModeSpec:
    return ModeSpec(f"cacheblend@{ratio:g}", "cacheblend", ratio)


@dataclass
class Outcome:
    """One prompt prefilled (and answered) in one mode."""
    answer: str                 # first line of the generation
    generation: str
    token_ids: list[int]
    logits: torch.Tensor        # [V] float32, last prompt token
    ttft_s: float
    prompt_tokens: int
    tokens_recomputed: int
    chunk_tokens: int
    kv_fetch_s: float
    selection_s: float


def eval_settings(args=None, **overrides) -> Settings:
    """Settings for evaluation: the README instruction is the chat preamble (before the chunks)."""
    return load_settings(args, chat_preamble=ds.PREFIX, **overrides)


def make_store(settings: Settings, device: torch.device):
    """Chunk KV store: the serving store's memory tier(s) alone (no disk, Redis or S3), chunks kept
    in kv_storage_dtype (float16 by default, as served; `--kv-storage-dtype float32` for exact KV)."""
    from kvstore import build_store
    return build_store(settings.model_copy(update={"kv_disk_bytes": 0, "redis_url": None, "s3_bucket": None}), device)


class Harness:
    """The loaded model, one engine per distinct engine-level setting, and the shared store."""

    def __init__(self, settings: Settings, engine: Optional[LLMEngine] = None):
        self.settings = settings
        if engine is None:
            from engine.device import resolve_device
            engine = LLMEngine(settings, store=make_store(settings, resolve_device(settings.device)))
        self.engines: dict[str, LLMEngine] = {"default": engine}
        self.overrides: dict[str, dict] = {"default": {}}

    @property
    def default(self) -> LLMEngine:
        return self.engines["default"]

    def add_engine(self, name: str, overrides: dict) -> None:
        """An engine with engine-level setting overrides, sharing the model, tokenizer and store."""
        if name in self.engines:
            return
        base = self.default
        s = Settings(**{**self.settings.model_dump(), **overrides})
        self.engines[name] = LLMEngine(s, store=base.store, model=base.model, tokenizer=base.tokenizer)
        self.overrides[name] = overrides

    def close(self) -> None:
        close = getattr(self.default.store, "close", None)
        if close is not None:
            close()


def ensure_chunks(engine: LLMEngine, segments: Iterable[Segment]) -> None:
    for seg in segments:
        if seg.kind == "chunk":
            engine.ensure_chunk(seg)


def drop_chunks(engine: LLMEngine, segments: Iterable[Segment]) -> None:
    """Forget a question's chunk KV (bounds memory over a long run)."""
    for seg in segments:
        if seg.kind == "chunk":
            engine.store.delete(seg.chunk_key)


def measure(engine: LLMEngine, segments: list[Segment], spec: ModeSpec, max_new_tokens: int = 32,
            warm: bool = False) -> Outcome:
    """Prefill `segments` in `spec`'s mode (timed to the first token), then decode greedily.

    Decoding stops at EOS, after `max_new_tokens` tokens, or once the first line is complete
    (the answer is the first line). `max_new_tokens=0` measures the first token only.
    """
    engine.prefix_cache.clear()
    if spec.mode == "prefix_cache" or (warm and spec.mode != "full_prefill"):
        engine.warm_prefix(segments)
    N = sum(len(s) for s in segments)
    if N + max_new_tokens > engine.max_model_len:
        raise ValueError(f"prompt of {N} tokens + {max_new_tokens} new tokens exceeds max_model_len {engine.max_model_len}")
    t0 = time.perf_counter()
    pre = engine.prefill(segments, spec.blend(), N + max(max_new_tokens, 1))
    int(pre.result.logits.argmax())  # the first token: reading it waits for the device, so TTFT is complete
    ttft = time.perf_counter() - t0
    engine.prefix_cache.clear()

    def text_of(ids: list[int]) -> str:
        return engine.tokenizer.decode([t for t in ids if t not in engine.eos_ids], skip_special_tokens=True)

    def first_line_done(ids: list[int]) -> bool:
        text = text_of(ids).lstrip("\n")
        return bool(text) and "\n" in text

    ids = run_to_end(greedy_steps(engine.model, pre.result.cache, pre.result.logits, max_new_tokens, engine.eos_ids,
                                  done=first_line_done))
    text = text_of(ids)
    st = pre.result.stats
    return Outcome(ds.first_line(text), text, ids, pre.result.logits.detach().float().cpu(), ttft, st.num_tokens,
                   st.recomputed_tokens, st.cached_tokens, pre.kv_fetch_s, st.selection_s)


def warm_up(harness: Harness, record: ds.Record) -> None:
    """Allocator, thread pool, first-call overheads: paid untimed, on a short prompt."""
    segs = ds.build_segments(harness.default, ds.truncate(record, 400), 1)
    ensure_chunks(harness.default, segs)
    for spec in (base_spec("full_prefill"), cacheblend_spec(0.15)):
        measure(harness.default, segs, spec, max_new_tokens=1)


def evaluate(harness: Harness, records: Sequence[ds.Record], specs: Sequence[ModeSpec], *, num_passages: Optional[int],
             max_new_tokens: int, warm: bool, progress: bool = True, warmup: bool = True,
             done: Sequence[dict] = (), on_question: Optional[Callable[[list[dict]], None]] = None) -> dict:
    """Run every spec on every record (full_prefill and full_reuse among them: the references).

    Returns {"per_spec": label -> per-question metric rows, "questions": one row per question
    with every spec's metrics}. The spec order is rotated from one question to the next so that
    machine noise is spread over all of them. `done`: question rows of an interrupted run of the
    same plan, taken as they are; `on_question(questions)` is called after each new question.
    """
    from tqdm import tqdm

    specs = list(specs)
    per_spec: dict[str, list[dict]] = {s.label: [] for s in specs}
    questions = []
    earlier = {q["index"]: q for q in done}
    if warmup and any(r.index not in earlier for r in records):
        warm_up(harness, next(r for r in records if r.index not in earlier))
    watch = next((s.label for s in specs if s.mode == "cacheblend"), None)  # shown on the progress bar
    bar = tqdm(records, desc="eval", unit="q", disable=not progress, file=sys.stderr)
    for qi, rec in enumerate(bar):
        if rec.index in earlier:
            q = earlier[rec.index]
            missing = [s.label for s in specs if s.label not in q["results"]]
            if missing:
                raise ValueError(f"question {rec.index} of the earlier run lacks {missing}: not the same plan")
            for spec in specs:
                per_spec[spec.label].append(q["results"][spec.label])
            questions.append(q)
            continue
        segments = {}
        for key, engine in harness.engines.items():
            if any(s.engine == key for s in specs):
                segments[key] = ds.build_segments(engine, rec, num_passages)
                ensure_chunks(engine, segments[key])  # precompute: not timed
        outcomes: dict[str, Outcome] = {}
        for spec in specs[qi % len(specs):] + specs[:qi % len(specs)]:
            outcomes[spec.label] = measure(harness.engines[spec.engine], segments[spec.engine], spec, max_new_tokens, warm)
        ref = outcomes["full_prefill"]
        q = {"index": rec.index, "question": rec.question, "answers": list(rec.answers),
             "prompt_tokens": ref.prompt_tokens, "results": {}}
        for spec in specs:
            m = compare(outcomes[spec.label], ref, outcomes["full_reuse"], rec.answers)
            if spec.engine != "default":  # also against its own engine's full_reuse
                own = outcomes[base_spec("full_reuse", spec.engine).label]
                m["kl_below_own_full_reuse"] = m["kl_first_token"] < first_token_kl(ref.logits, own.logits)
            per_spec[spec.label].append(m)
            q["results"][spec.label] = m
        questions.append(q)
        for key, engine in harness.engines.items():
            if key in segments:
                drop_chunks(engine, segments[key])
        del outcomes
        gc.collect()
        if on_question is not None:
            on_question(questions)
        if progress and watch:
            bar.set_postfix(kl=f"{mean([x['kl_first_token'] for x in per_spec[watch]]):.3f}",
                            f1=f"{mean([x['f1'] for x in per_spec['full_prefill']]):.2f}")
    return {"per_spec": per_spec, "questions": questions}
