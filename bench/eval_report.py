"""Eval tables for the terminal: the mode sweep, the variants, and the bootstrap intervals."""

from __future__ import annotations

import math
from typing import Callable

from bench.eval_metrics import INTERVALS
from bench.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

Column = tuple[str, Callable[[dict], str], int]  # header, cell text of a row, width (negative: left-aligned)


def fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def table(rows: list[dict], columns: list[Column]) -> str:
    def cell(text: str, width: int) -> str:
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"
    lines = [" ".join(cell(head, width) for head, _, width in columns)]
    lines += [" ".join(cell(text(r), width) for _, text, width in columns) for r in rows]
    return "\n".join(lines)


def num(head: str, key: str, spec: str = ".3f", width: int = 8) -> Column:
    return head, lambda r: fmt(r.get(key), spec), width


def with_interval(head: str, key: str) -> Column:
    """'mean [lo, hi]' of a row value and its 95% bootstrap interval."""
    def text(r: dict) -> str:
        value, ci = r.get(key), r["ci95"].get(key)
        if value is None:
            return "-"
        return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"
    return head, text, 18


SPEEDUP: Column = ("speedup", lambda r: fmt(r.get("speedup_vs_full_prefill"), ".2f") + "x", 7)
MODES: list[Column] = [
    ("mode", lambda r: r["label"], -20), num("ratio", "ratio", ".2f", 5), num("F1", "f1", width=6),
    num("agreeF1", "agreement_f1", width=7), num("EM", "exact_match", ".2f", 5), num("KL", "kl_first_token", ".4f"),
    num("KL<reuse", "kl_below_full_reuse", ".2f"), num("top1", "top1_agreement", ".2f", 5), num("ttft_med", "ttft_median_s"),
    num("ttft_p95", "ttft_p95_s"), SPEEDUP, num("recomp", "tokens_recomputed", ".0f", 7), num("tokens", "prompt_tokens", ".0f", 6),
]
VARIANTS: list[Column] = [
    ("variant", lambda r: r["variant"], -12), num("ratio", "ratio", ".2f", 5), num("KL", "kl_first_token", ".4f"),
    num("KL<reuse", "kl_below_full_reuse", ".2f"), num("KL<own", "kl_below_own_full_reuse", ".2f", 6),
    num("top1", "top1_agreement", ".2f", 5), num("F1", "f1", width=6), num("agreeF1", "agreement_f1", width=7),
    num("ttft_med", "ttft_median_s"), SPEEDUP, num("recomp", "tokens_recomputed", ".0f", 7),
    (" description", lambda r: " " + r["description"], -1),
]
NAMES = {"kl_vs_full_reuse": "KL/reuse", "kl_below_full_reuse": "KL<reuse", "agreement_f1": "agreeF1",
         "exact_match": "EM", "top1_agreement": "top1"}
INTERVAL_COLUMNS: list[Column] = [
    ("mode", lambda r: f"variant:{r['variant']}@{r['ratio']:g}" if "variant" in r else r["label"], -24), ("n", lambda r: str(r["n"]), 4),
] + [with_interval(NAMES[k], k) for k in ["kl_vs_full_reuse"] + INTERVALS]


def format_table(rows: list[dict]) -> str:
    return table(rows, MODES)


def format_variants(rows: list[dict]) -> str:
    return table(rows, VARIANTS)


def format_intervals(rows: list[dict]) -> str:
    """Mean and 95% bootstrap interval of the KL ratio to full_reuse and of the agreement metrics."""
    return (f"mean [95% bootstrap interval] over questions ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})\n"
            + table(rows, INTERVAL_COLUMNS))
