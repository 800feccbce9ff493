"""`cacheblend eval`: answer quality and TTFT of every prefill mode on MuSiQue, side by side.

For each question the prompt is laid out as in ../shared/data/README.md (see bench/dataset.py),
rendered through the model's chat template, and its chunk KV is precomputed first (not timed).
Then every mode answers it greedily: `full_prefill` (the reference), `prefix_cache`, `full_reuse`
and `cacheblend` at each `--ratios` value, plus the `--variants` (configuration variants of
cacheblend, see VARIANTS). The order of the modes is rotated from one question to the next so
that machine noise is spread over all of them.

Per mode the table (and JSON row) gives: F1 against the gold answers; agreement with
full_prefill's answer (token F1, exact-match share); the KL divergence KL(full_prefill || mode)
of the first-token distribution (last-token logits); the share of questions where that KL is
below full_reuse's; top-1 agreement of the first token; TTFT median and p95; tokens recomputed.

Prefix-cache policy. The prefix cache is cleared before every measured prefill, so no mode
profits from an exact prefix another mode or question left behind; every mode starts cold
except chunk KV. The one exception is `prefix_cache` itself, whose point is reusing a prefix:
it gets the instruction prefix (chat template head + instruction, the only prefix MuSiQue
prompts share, as their passages differ) warmed by an earlier, untimed request, as vLLM's
automatic prefix caching would have it. `--warm-prefix` warms that prefix for full_reuse and
cacheblend as well (what a server sees after its first request).

TTFT = the engine's prefill (chunk KV fetch from the store, selection, recompute, and the
engine's prefix-cache bookkeeping) plus sampling the first token, timed in-process; chunk
precompute and prefix warm-up are not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from bench import dataset as ds
from config import MODES, add_settings_flags, load_settings
from config.settings import Settings
from engine.decode import decode_step
from engine.llm_engine import LLMEngine
from engine.request import BlendParams
from engine.segments import Segment

log = logging.getLogger(__name__)

DEFAULT_RATIOS = "0.05,0.1,0.15,0.2,0.3,1.0"
SETTINGS_FLAGS = ["model", "device", "dtype", "data_dir", "max_model_len", "check_layers", "check_ratios",
                  "selection_signal", "sensitivity_pool", "chunk_context", "recompute_chunk_head", "kv_storage_dtype"]


# --- what one measurement is --------------------------------------------------------------


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


# --- the engines --------------------------------------------------------------------------


def eval_settings(args: Optional[argparse.Namespace] = None, **overrides) -> Settings:
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
            from engine.llm_engine import resolve_device
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


# --- measuring ----------------------------------------------------------------------------


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
    first = int(pre.result.logits.argmax())
    ttft = time.perf_counter() - t0
    engine.prefix_cache.clear()
    ids = [first]
    cache = pre.result.cache
    text = ""
    while max_new_tokens and len(ids) < max_new_tokens and ids[-1] not in engine.eos_ids:
        text = engine.tokenizer.decode([t for t in ids if t not in engine.eos_ids], skip_special_tokens=True)
        if text.lstrip("\n") and "\n" in text.lstrip("\n"):
            break  # first line complete
        ids.append(int(decode_step(engine.model, [cache], [ids[-1]])[0].argmax()))
    text = engine.tokenizer.decode([t for t in ids if t not in engine.eos_ids], skip_special_tokens=True)
    st = pre.result.stats
    return Outcome(ds.first_line(text), text, ids, pre.result.logits.detach().float().cpu(), ttft, st.num_tokens,
                   st.recomputed_tokens, st.cached_tokens, pre.kv_fetch_s, st.selection_s)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(ref) || softmax(logits)) in float64, nats."""
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


def compare(out: Outcome, ref: Outcome, reuse: Optional[Outcome], answers: Sequence[str]) -> dict:
    """Per-question metrics of `out` against the full_prefill reference `ref`."""
    kl = kl_divergence(ref.logits, out.logits)
    kl_reuse = kl_divergence(ref.logits, reuse.logits) if reuse is not None else None
    return {
        "answer": out.answer,
        "f1": ds.best_f1(out.answer, answers),
        "agreement_f1": ds.token_f1(out.answer, ref.answer),
        "exact_match": ds.exact_match(out.answer, ref.answer),
        "same_answer": out.answer == ref.answer,
        "kl_first_token": kl,
        "kl_below_full_reuse": (kl < kl_reuse) if kl_reuse is not None else None,
        "top1_agreement": out.token_ids[0] == ref.token_ids[0],
        "ttft_s": out.ttft_s,
        "prompt_tokens": out.prompt_tokens,
        "tokens_recomputed": out.tokens_recomputed,
        "chunk_tokens": out.chunk_tokens,
        "kv_fetch_s": out.kv_fetch_s,
        "selection_s": out.selection_s,
    }


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _mean(xs: Sequence) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(spec: ModeSpec, per_question: list[dict]) -> dict:
    """One summary row from the per-question metrics of one spec."""
    ttfts = [q["ttft_s"] for q in per_question]
    return {
        "label": spec.label,
        "mode": spec.mode,
        "ratio": spec.ratio if spec.mode == "cacheblend" else None,
        "n": len(per_question),
        "f1": _mean([q["f1"] for q in per_question]),
        "agreement_f1": _mean([q["agreement_f1"] for q in per_question]),
        "exact_match": _mean([q["exact_match"] for q in per_question]),
        "same_answer": _mean([q["same_answer"] for q in per_question]),
        "kl_first_token": _mean([q["kl_first_token"] for q in per_question]),
        "kl_below_full_reuse": _mean([q["kl_below_full_reuse"] for q in per_question]),
        "top1_agreement": _mean([q["top1_agreement"] for q in per_question]),
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_mean_s": _mean(ttfts),
        "tokens_recomputed": _mean([q["tokens_recomputed"] for q in per_question]),
        "prompt_tokens": _mean([q["prompt_tokens"] for q in per_question]),
        "kv_fetch_median_s": statistics.median(q["kv_fetch_s"] for q in per_question) if per_question else None,
    }


# --- variants -----------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    description: str
    engine_overrides: dict = field(default_factory=dict)   # engine-level Settings overrides
    check_layers: Optional[tuple[int, ...]] = None
    check_ratios: Optional[tuple[float, ...]] = None
    selection_signal: Optional[str] = None

    @property
    def engine_key(self) -> str:
        if not self.engine_overrides:
            return "default"
        return ",".join(f"{k}={v}" for k, v in sorted(self.engine_overrides.items()))

    def spec(self, ratio: float) -> ModeSpec:
        r = self.check_ratios[-1] if self.check_ratios else ratio
        return ModeSpec(f"variant:{self.name}", "cacheblend", r, self.check_layers, self.check_ratios,
                        self.selection_signal, self.engine_key)


VARIANT_HELP = ("default | headN (recompute the first N tokens of every chunk) | prefix_ctx / sink_ctx (chunk KV "
                "precomputed after the prompt prefix / a sink token) | gradual (check layers 1,8,16 at ratios "
                ".2,.15,.1) | key_signal / value_signal / sensitivity_signal | checkN (one check layer N) | random_sel (control: as many "
                "tokens chosen at random instead of by deviation); 'all' = default,head4,prefix_ctx,gradual,value_signal,key_signal,"
                "check0,check2,check3,random_sel")
ALL_VARIANTS = "default,head4,prefix_ctx,gradual,value_signal,key_signal,check0,check2,check3,random_sel"


def parse_variant(name: str, num_layers: int) -> Variant:
    name = name.strip()
    if name == "default":
        return Variant(name, "settings as given")
    if name.startswith("head") and name[4:].isdigit():
        n = int(name[4:])
        return Variant(name, f"recompute the first {n} tokens of every chunk", {"recompute_chunk_head": n})
    if name in ("prefix_ctx", "sink_ctx"):
        ctx = name.removesuffix("_ctx")
        return Variant(name, f"chunk KV precomputed after the {'prompt prefix' if ctx == 'prefix' else 'sink token'}",
                       {"chunk_context": ctx})
    if name == "gradual":
        layers = (1, 8, 16)
        if layers[-1] >= num_layers:  # small models: spread the same three steps over their depth
            layers = tuple(sorted({1, max(2, num_layers // 4), max(3, num_layers // 2)}))
            layers = tuple(x for x in layers if x < num_layers)
        ratios = (0.2, 0.15, 0.1)[-len(layers):] if len(layers) < 3 else (0.2, 0.15, 0.1)
        return Variant(name, f"gradual filtering: check layers {list(layers)} at ratios {list(ratios)}",
                       check_layers=layers, check_ratios=ratios)
    if name in ("key_signal", "value_signal"):
        sig = name.removesuffix("_signal")
        return Variant(name, f"HKVD selected by {sig} deviation alone", selection_signal=sig)
    if name == "sensitivity_signal":
        return Variant(name, "HKVD: the most context-sensitive of the most value-deviating tokens",
                       {"selection_signal": "sensitivity"}, selection_signal="sensitivity")
    if name == "random_sel":
        return Variant(name, "control: the same number of chunk tokens, chosen at random", selection_signal="random")
    if name.startswith("check") and name[5:].isdigit():
        layer = int(name[5:])
        if not 0 <= layer < num_layers:
            raise ValueError(f"variant {name}: the model has layers 0..{num_layers - 1}")
        return Variant(name, f"one check layer at {layer}", check_layers=(layer,))
    raise ValueError(f"unknown variant {name!r}; known: {VARIANT_HELP}")


def parse_variants(text: Optional[str], num_layers: int) -> list[Variant]:
    if not text:
        return []
    if text.strip() == "all":
        text = ALL_VARIANTS
    return [parse_variant(n, num_layers) for n in text.split(",") if n.strip()]


# --- the run ------------------------------------------------------------------------------


@dataclass
class Plan:
    specs: list[ModeSpec]           # everything run per question (deduplicated)
    sweep: list[ModeSpec]           # the rows of the main table, in order
    variants: list[tuple[Variant, ModeSpec, ModeSpec]]  # (variant, its spec, its engine's full_reuse)


def make_plan(harness: Harness, modes: Sequence[str], ratios: Sequence[float], variants: Sequence[Variant],
              variant_ratio: float) -> Plan:
    sweep = [base_spec("full_prefill")] + [base_spec(m) for m in modes if m in ("prefix_cache", "full_reuse")]
    sweep += [cacheblend_spec(r) for r in ratios]
    if not any(s.mode == "full_reuse" for s in sweep):
        sweep.append(base_spec("full_reuse"))  # the KL-below-full-reuse reference
    specs = list(sweep)
    seen = {s.identity: s for s in specs}
    var_rows = []
    for v in variants:
        harness.add_engine(v.engine_key, v.engine_overrides)
        spec = v.spec(variant_ratio)
        spec = seen.setdefault(spec.identity, spec)
        if spec not in specs:
            specs.append(spec)
        reuse = seen.setdefault(base_spec("full_reuse", v.engine_key).identity, base_spec("full_reuse", v.engine_key))
        if reuse not in specs:
            specs.append(reuse)
        var_rows.append((v, spec, reuse))
    return Plan(specs, sweep, var_rows)


def evaluate(harness: Harness, records: Sequence[ds.Record], plan: Plan, *, num_passages: Optional[int],
             max_new_tokens: int, warm: bool, progress: bool = True, warmup: bool = True) -> dict:
    """Run every spec on every record; per-question metrics keyed by spec label."""
    from tqdm import tqdm

    per_spec: dict[str, list[dict]] = {s.label: [] for s in plan.specs}
    questions = []
    if warmup and records:  # allocator, thread pool, first-call overheads: untimed, on a short prompt
        segs = ds.build_segments(harness.default, ds.truncate(records[0], 400), 1)
        ensure_chunks(harness.default, segs)
        for spec in (base_spec("full_prefill"), cacheblend_spec(0.15)):
            measure(harness.default, segs, spec, max_new_tokens=1)
    bar = tqdm(records, desc="eval", unit="q", disable=not progress, file=sys.stderr)
    for qi, rec in enumerate(bar):
        segments = {}
        for key, engine in harness.engines.items():
            if any(s.engine == key for s in plan.specs):
                segments[key] = ds.build_segments(engine, rec, num_passages)
                ensure_chunks(engine, segments[key])  # precompute: not timed
        order = plan.specs[qi % len(plan.specs):] + plan.specs[:qi % len(plan.specs)]
        outcomes: dict[str, Outcome] = {}
        for spec in order:
            outcomes[spec.label] = measure(harness.engines[spec.engine], segments[spec.engine], spec, max_new_tokens, warm)
        ref = outcomes["full_prefill"]
        q = {"index": rec.index, "question": rec.question, "answers": list(rec.answers),
             "prompt_tokens": ref.prompt_tokens, "results": {}}
        for spec in plan.specs:
            reuse_label = "full_reuse"
            m = compare(outcomes[spec.label], ref, outcomes[reuse_label], rec.answers)
            if spec.engine != "default":  # also against its own engine's full_reuse
                own = base_spec("full_reuse", spec.engine).label
                m["kl_below_own_full_reuse"] = m["kl_first_token"] < kl_divergence(ref.logits, outcomes[own].logits)
            per_spec[spec.label].append(m)
            q["results"][spec.label] = m
        questions.append(q)
        for key, engine in harness.engines.items():
            if key in segments:
                drop_chunks(engine, segments[key])
        del outcomes
        gc.collect()
        if progress:
            cb = [s for s in plan.sweep if s.mode == "cacheblend"]
            if cb:
                bar.set_postfix(kl=f"{_mean([x['kl_first_token'] for x in per_spec[cb[0].label]]):.3f}",
                                f1=f"{_mean([x['f1'] for x in per_spec['full_prefill']]):.2f}")
    return {"per_spec": per_spec, "questions": questions}


def summarize(plan: Plan, per_spec: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    rows = [aggregate(s, per_spec[s.label]) for s in plan.sweep]
    full = next((r for r in rows if r["mode"] == "full_prefill"), None)
    for r in rows:
        if full and r["ttft_median_s"]:
            r["speedup_vs_full_prefill"] = full["ttft_median_s"] / r["ttft_median_s"]
    var_rows = []
    for v, spec, reuse in plan.variants:
        row = aggregate(spec, per_spec[spec.label])
        row.update({"variant": v.name, "description": v.description,
                    "check_layers": list(spec.check_layers) if spec.check_layers else None,
                    "check_ratios": list(spec.check_ratios) if spec.check_ratios else None,
                    "selection_signal": spec.selection_signal, "engine_overrides": v.engine_overrides,
                    "kl_full_reuse_same_engine": _mean([q["kl_first_token"] for q in per_spec[reuse.label]])})
        own = [q.get("kl_below_own_full_reuse") for q in per_spec[spec.label]]
        row["kl_below_own_full_reuse"] = _mean(own) if any(x is not None for x in own) else row["kl_below_full_reuse"]
        if full and row["ttft_median_s"]:
            row["speedup_vs_full_prefill"] = full["ttft_median_s"] / row["ttft_median_s"]
        var_rows.append(row)
    return rows, var_rows


def context_scaling(harness: Harness, records: Sequence[ds.Record], points: Sequence[int], ratio: float,
                    repeat: int = 1, warm: bool = False, progress: bool = True) -> list[dict]:
    """TTFT (first token only) of the four modes vs the number of passages."""
    from tqdm import tqdm

    engine = harness.default
    specs = [base_spec("full_prefill"), base_spec("prefix_cache"), base_spec("full_reuse"), cacheblend_spec(ratio)]
    samples = {(p, s.label): [] for p in points for s in specs}
    tokens = {p: [] for p in points}
    jobs = [(p, rec) for p in points for rec in records]
    for i, (p, rec) in enumerate(tqdm(jobs, desc="context", unit="prompt", disable=not progress, file=sys.stderr)):
        segs = ds.build_segments(engine, rec, p)
        ensure_chunks(engine, segs)
        tokens[p].append(sum(len(s) for s in segs))
        for r in range(repeat):
            k = (i + r) % len(specs)
            for spec in specs[k:] + specs[:k]:
                samples[(p, spec.label)].append(measure(engine, segs, spec, max_new_tokens=0, warm=warm).ttft_s)
        drop_chunks(engine, segs)
    rows = []
    for spec in specs:
        for p in points:
            xs = samples[(p, spec.label)]
            rows.append({"label": spec.label, "mode": spec.mode, "ratio": spec.ratio, "passages": p,
                         "context_tokens": _mean(tokens[p]), "n": len(xs),
                         "ttft_median_s": statistics.median(xs), "ttft_p95_s": percentile(xs, 95)})
    return rows


# --- printing -----------------------------------------------------------------------------


def _fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':<20} {'ratio':>5} {'F1':>6} {'agreeF1':>7} {'EM':>5} {'KL':>8} {'KL<reuse':>8} {'top1':>5} "
            f"{'ttft_med':>8} {'ttft_p95':>8} {'speedup':>7} {'recomp':>7} {'tokens':>6}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['label']:<20} {_fmt(r['ratio'], '.2f'):>5} {_fmt(r['f1']):>6} {_fmt(r['agreement_f1']):>7} "
            f"{_fmt(r['exact_match'], '.2f'):>5} {_fmt(r['kl_first_token'], '.4f'):>8} {_fmt(r['kl_below_full_reuse'], '.2f'):>8} "
            f"{_fmt(r['top1_agreement'], '.2f'):>5} {_fmt(r['ttft_median_s']):>8} {_fmt(r['ttft_p95_s']):>8} "
            f"{_fmt(r.get('speedup_vs_full_prefill'), '.2f'):>6}x {_fmt(r['tokens_recomputed'], '.0f'):>7} {_fmt(r['prompt_tokens'], '.0f'):>6}")
    return "\n".join(lines)


def format_variants(rows: list[dict]) -> str:
    head = (f"{'variant':<12} {'ratio':>5} {'KL':>8} {'KL<reuse':>8} {'KL<own':>6} {'top1':>5} {'F1':>6} {'agreeF1':>7} "
            f"{'ttft_med':>8} {'speedup':>7} {'recomp':>7}  description")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['variant']:<12} {_fmt(r['ratio'], '.2f'):>5} {_fmt(r['kl_first_token'], '.4f'):>8} "
            f"{_fmt(r['kl_below_full_reuse'], '.2f'):>8} {_fmt(r['kl_below_own_full_reuse'], '.2f'):>6} "
            f"{_fmt(r['top1_agreement'], '.2f'):>5} {_fmt(r['f1']):>6} {_fmt(r['agreement_f1']):>7} "
            f"{_fmt(r['ttft_median_s']):>8} {_fmt(r.get('speedup_vs_full_prefill'), '.2f'):>6}x "
            f"{_fmt(r['tokens_recomputed'], '.0f'):>7}  {r['description']}")
    return "\n".join(lines)


def format_context(rows: list[dict]) -> str:
    points = sorted({r["passages"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["passages"]): r for r in rows}
    lines = [f"{'passages':<20} " + " ".join(f"{p:>8}" for p in points),
             f"{'tokens':<20} " + " ".join(f"{by[(labels[0], p)]['context_tokens']:>8.0f}" for p in points)]
    for lab in labels:
        lines.append(f"{lab:<20} " + " ".join(f"{by[(lab, p)]['ttft_median_s']:>8.3f}" for p in points))
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text and text.strip() != "none" else []


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text and text.strip() != "none" else []


def add_common_args(p: argparse.ArgumentParser, limit: Optional[int]) -> None:
    """Flags shared by eval and tune."""
    p.add_argument("--dataset", type=Path, default=ds.DEFAULT_DATASET, help="musique_s.json (default: %(default)s)")
    p.add_argument("--limit", type=int, default=limit, help="questions to use (default: %(default)s; none = all)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch and, with --shuffle, which questions are drawn")
    p.add_argument("--shuffle", action="store_true", help="draw --limit questions at random (with --seed) instead of the first ones")
    p.add_argument("--passages", type=int, default=None, help="passages per question (default: all, 10 in musique_s)")
    p.add_argument("--passage-chars", type=int, default=None,
                   help="cut every passage to this many characters (quick smoke runs; default: whole passages)")
    p.add_argument("--warm-prefix", action="store_true", help="also give full_reuse and cacheblend the warm instruction prefix")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_settings_flags(p, fields=SETTINGS_FLAGS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="answer quality and TTFT of every prefill mode on MuSiQue",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, limit=None)
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="cacheblend recompute ratios (default: %(default)s)")
    p.add_argument("--modes", default="prefix_cache,full_reuse",
                   help="baseline modes besides full_prefill (always run) (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length cap (default: %(default)s)")
    p.add_argument("--variants", default=None, help=f"comma list of cacheblend variants to run side by side: {VARIANT_HELP}")
    p.add_argument("--variant-ratio", type=float, default=0.15, help="recompute ratio of the variants (default: %(default)s)")
    p.add_argument("--context-points", default="2,4,6,8,10",
                   help="passage counts for the TTFT-vs-context plot; 'none' skips it (default: %(default)s)")
    p.add_argument("--context-questions", type=int, default=3, help="questions per context point (default: %(default)s)")
    p.add_argument("--context-repeat", type=int, default=1, help="repeats per context point and question (default: %(default)s)")
    p.add_argument("--context-ratio", type=float, default=0.15, help="cacheblend ratio in the context sweep (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write config, rows, variants, context rows and per-question results here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.set_defaults(func=run)


def setup(args: argparse.Namespace) -> tuple[Harness, list[ds.Record]]:
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    records = [ds.truncate(r, args.passage_chars) for r in ds.select(ds.load(args.dataset), args.limit, args.seed, args.shuffle)]
    if not records:
        raise SystemExit("no questions selected")
    harness = Harness(eval_settings(args))
    return harness, records


def config_of(args: argparse.Namespace, harness: Harness) -> dict:
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    s = harness.settings
    cfg.update({"model_name": harness.default.model_name, "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__, "check_layers": s.check_layers, "check_ratios": s.check_ratios,
                "selection_signal": s.selection_signal, "chunk_context": s.chunk_context,
                "recompute_chunk_head": s.recompute_chunk_head, "kv_storage_dtype": s.kv_storage_dtype,
                "device": str(harness.default.device), "dtype": str(harness.default.model.dtype)})
    return cfg


def run(args: argparse.Namespace) -> int:
    harness, records = setup(args)
    try:
        num_layers = harness.default.model.cfg.num_layers
        variants = parse_variants(args.variants, num_layers)
        modes = [m for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES or m in ("cacheblend",)]
        if bad:
            raise SystemExit(f"--modes takes prefix_cache,full_reuse (full_prefill always runs); got {bad}")
        plan = make_plan(harness, modes, parse_floats(args.ratios), variants, args.variant_ratio)
        t0 = time.perf_counter()
        res = evaluate(harness, records, plan, num_passages=args.passages, max_new_tokens=args.max_new_tokens,
                       warm=args.warm_prefix, progress=not args.no_progress)
        rows, var_rows = summarize(plan, res["per_spec"])
        points = parse_ints(args.context_points)
        ctx_rows = []
        if points:
            top = max(len(r.passages) for r in records)
            points = [p for p in points if p <= top]
            ctx_rows = context_scaling(harness, records[: args.context_questions], points, args.context_ratio,
                                       args.context_repeat, args.warm_prefix, progress=not args.no_progress)
        elapsed = time.perf_counter() - t0
        print(f"{len(records)} questions, {_fmt(rows[0]['prompt_tokens'], '.0f')} prompt tokens on average, "
              f"{harness.default.model_name} on {harness.default.device}, {torch.get_num_threads()} threads, {elapsed:.0f} s")
        print(format_table(rows))
        if var_rows:
            print("\nvariants (cacheblend; KL<reuse: share of questions with KL below default full_reuse's; "
                  "KL<own: below the full_reuse of the variant's own engine)")
            print(format_variants(var_rows))
        if ctx_rows:
            print("\nTTFT median (s) vs context")
            print(format_context(ctx_rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            out = {"config": config_of(args, harness), "rows": rows, "variants": var_rows, "context": ctx_rows,
                   "questions": res["questions"], "elapsed_s": elapsed}
            args.json.write_text(json.dumps(out, indent=2, default=str))
        if args.plots:
            from bench import plots
            written = plots.eval_plots(rows, ctx_rows, var_rows, args.plots)
            print("plots: " + ", ".join(str(p) for p in written))
    finally:
        harness.close()
    return 0
