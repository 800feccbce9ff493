"""Eval metrics: one question's outcome against the references, and the summary rows (pure).

Per question: F1 against the gold answers; agreement with full_prefill's answer (token F1,
exact match); the first-token KL(full_prefill || mode); whether that KL is below full_reuse's;
top-1 agreement of the first token; TTFT and tokens recomputed. Per spec, a row of means, TTFT
median and p95, and 95% bootstrap intervals (fixed seed, questions resampled) of the KL ratio
to full_reuse and of the agreement metrics.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Optional, Sequence

from bench import dataset as ds
from bench.stats import mean, mean_interval, percentile, ratio_interval
from engine.quality import first_token_kl

if TYPE_CHECKING:
    from bench.eval_harness import ModeSpec, Outcome
    from bench.eval_variants import Plan

MEANS = ["f1", "agreement_f1", "exact_match", "same_answer", "kl_first_token", "kl_below_full_reuse", "top1_agreement"]
INTERVALS = ["kl_below_full_reuse", "agreement_f1", "exact_match", "top1_agreement"]  # besides kl_vs_full_reuse


def compare(out: Outcome, ref: Outcome, reuse: Optional[Outcome], answers: Sequence[str]) -> dict:
    """Per-question metrics of `out` against the full_prefill reference `ref`."""
    kl = first_token_kl(ref.logits, out.logits)
    kl_reuse = first_token_kl(ref.logits, reuse.logits) if reuse is not None else None
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


def kl_ratio(per_question: list[dict], reuse: list[dict]) -> Optional[float]:
    """Mean KL over mean full_reuse KL on the same questions (the paper's headline comparison)."""
    num, den = mean([q["kl_first_token"] for q in per_question]), mean([q["kl_first_token"] for q in reuse])
    return num / den if num is not None and den else None


def intervals(per_question: list[dict], reuse: Optional[list[dict]]) -> dict[str, Optional[tuple[float, float]]]:
    """95% bootstrap intervals of the KL ratio to full_reuse and of the agreement metrics."""
    out = {}
    if reuse is not None:
        out["kl_vs_full_reuse"] = ratio_interval([q["kl_first_token"] for q in per_question],
                                                 [q["kl_first_token"] for q in reuse])
    for key in INTERVALS:
        out[key] = mean_interval([q[key] for q in per_question])
    return out


def aggregate(spec: ModeSpec, per_question: list[dict], reuse: Optional[list[dict]] = None) -> dict:
    """One summary row from the per-question metrics of one spec; `reuse`: full_reuse's rows on
    the same questions, in the same order (for the KL ratio)."""
    ttfts = [q["ttft_s"] for q in per_question]
    row = {"label": spec.label, "mode": spec.mode, "ratio": spec.ratio if spec.mode == "cacheblend" else None,
           "n": len(per_question)}
    row.update({key: mean([q[key] for q in per_question]) for key in MEANS})
    row.update({
        "kl_vs_full_reuse": kl_ratio(per_question, reuse) if reuse is not None else None,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_mean_s": mean(ttfts),
        "tokens_recomputed": mean([q["tokens_recomputed"] for q in per_question]),
        "prompt_tokens": mean([q["prompt_tokens"] for q in per_question]),
        "kv_fetch_median_s": statistics.median(q["kv_fetch_s"] for q in per_question) if per_question else None,
        "ci95": intervals(per_question, reuse),
    })
    return row


def summarize(plan: Plan, per_spec: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """(main table rows, variant rows); speedups are against full_prefill's TTFT median."""
    reuse = per_spec.get("full_reuse")
    rows = [aggregate(s, per_spec[s.label], reuse) for s in plan.sweep]
    full = next((r for r in rows if r["mode"] == "full_prefill"), None)
    for r in rows:
        if full and r["ttft_median_s"]:
            r["speedup_vs_full_prefill"] = full["ttft_median_s"] / r["ttft_median_s"]
    var_rows = []
    for v, spec, own_reuse in plan.variants:
        row = aggregate(spec, per_spec[spec.label], reuse)
        row.update({"variant": v.name, "description": v.description,
                    "check_layers": list(spec.check_layers) if spec.check_layers else None,
                    "check_ratios": list(spec.check_ratios) if spec.check_ratios else None,
                    "selection_signal": spec.selection_signal, "engine_overrides": v.engine_overrides,
                    "kl_full_reuse_same_engine": mean([q["kl_first_token"] for q in per_spec[own_reuse.label]])})
        own = [q.get("kl_below_own_full_reuse") for q in per_spec[spec.label]]
        row["kl_below_own_full_reuse"] = mean(own) if any(x is not None for x in own) else row["kl_below_full_reuse"]
        if full and row["ttft_median_s"]:
            row["speedup_vs_full_prefill"] = full["ttft_median_s"] / row["ttft_median_s"]
        var_rows.append(row)
    return rows, var_rows
