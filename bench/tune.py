"""`cacheblend tune`: pick the smallest recompute ratio whose quality is within a tolerance of the best.

Runs the eval machinery (bench/eval_harness.py: same prompts, same prefix-cache policy, same TTFT
timing) over a ratio sweep, with full_prefill as the reference and full_reuse for context.
Quality per ratio: first-token KL(full_prefill || cacheblend), top-1 agreement of the first
token and, with `--max-new-tokens` > 0, answer agreement / F1 (greedy answers).

Rule: with metric M (higher is better for top1_agreement, agreement_f1, f1; lower for
kl_first_token), best = the best M over the swept ratios; the chosen ratio is the smallest one
with M within `--tolerance` (absolute) of best. Prints the table and the choice; `--plot`
draws quality and TTFT vs ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from bench import eval as ev
from bench.eval_report import format_table
from bench.eval_variants import make_plan

DEFAULT_RATIOS = "0.02,0.05,0.1,0.15,0.2,0.3,0.5,1.0"
METRICS = {"top1_agreement": True, "kl_first_token": False, "agreement_f1": True, "f1": True}  # higher is better?


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="smallest recompute ratio whose quality is within a tolerance of the best",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_common_args(p, limit=20)
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="ratios to sweep (default: %(default)s)")
    p.add_argument("--metric", choices=sorted(METRICS), default="top1_agreement", help="quality metric (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="allowed absolute distance from the best value of --metric (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="greedy answer tokens (0: first token only, enough for KL/top-1) (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the rows and the choice here")
    p.add_argument("--plot", type=Path, default=None, help="write the quality/TTFT-vs-ratio PNG here")
    p.set_defaults(func=run)


def choose(rows: list[dict], metric: str, tolerance: float) -> tuple[Optional[float], Optional[float]]:
    """(chosen ratio, best value) over the cacheblend rows."""
    cb = sorted((r for r in rows if r["mode"] == "cacheblend" and r.get(metric) is not None), key=lambda r: r["ratio"])
    if not cb:
        return None, None
    higher = METRICS[metric]
    best = max(r[metric] for r in cb) if higher else min(r[metric] for r in cb)
    for r in cb:
        ok = r[metric] >= best - tolerance if higher else r[metric] <= best + tolerance
        if ok:
            return r["ratio"], best
    return cb[-1]["ratio"], best


def run(args: argparse.Namespace) -> int:
    if args.metric in ("agreement_f1", "f1") and args.max_new_tokens <= 0:
        raise SystemExit(f"--metric {args.metric} needs answers: pass --max-new-tokens (e.g. 32)")
    harness, records = ev.setup(args)
    try:
        plan = make_plan(harness, ["full_reuse"], ev.parse_floats(args.ratios), [], [])
        t0 = time.perf_counter()
        rows, _, questions = ev.run_plan(harness, records, plan, args)
        chosen, best = choose(rows, args.metric, args.tolerance)
        print(f"{len(records)} questions, {rows[0]['prompt_tokens']:.0f} prompt tokens on average, "
              f"{time.perf_counter() - t0:.0f} s")
        print(format_table(rows))
        if chosen is None:
            print("no cacheblend ratio measured", file=sys.stderr)
            return 1
        row = next(r for r in rows if r["mode"] == "cacheblend" and r["ratio"] == chosen)
        print(f"\nchosen recompute_ratio = {chosen:g}: {args.metric} {row[args.metric]:.4f} "
              f"(best {best:.4f}, tolerance {args.tolerance:g}), TTFT median {row['ttft_median_s']:.3f} s "
              f"({row.get('speedup_vs_full_prefill', float('nan')):.2f}x vs full_prefill)")
        print(f"serve with: --recompute-ratio {chosen:g}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"config": ev.config_of(args, harness), "rows": rows, "chosen_ratio": chosen,
                                             "metric": args.metric, "best": best, "tolerance": args.tolerance,
                                             "questions": questions}, indent=2, default=str))
        if args.plot:
            from bench import plots
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plots.tune_plot(rows, args.plot, chosen, args.metric)
            print(f"plot: {args.plot}")
    finally:
        harness.close()
    return 0
