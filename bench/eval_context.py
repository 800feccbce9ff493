"""The eval's context sweep: TTFT (first token only) of the four modes vs the number of passages."""

from __future__ import annotations

import statistics
import sys
from typing import Sequence

from bench import dataset as ds
from bench.eval_harness import Harness, base_spec, cacheblend_spec, drop_chunks, ensure_chunks, measure
from bench.stats import mean, percentile


def context_scaling(harness: Harness, records: Sequence[ds.Record], points: Sequence[int], ratio: float,
                    repeat: int = 1, warm: bool = False, progress: bool = True) -> list[dict]:
    """One row per (mode, passage count): TTFT median and p95 over records x repeats."""
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
            k = (i + r) % len(specs)  # rotate the mode order, as the eval does
            for spec in specs[k:] + specs[:k]:
                samples[(p, spec.label)].append(measure(engine, segs, spec, max_new_tokens=0, warm=warm).ttft_s)
        drop_chunks(engine, segs)
    rows = []
    for spec in specs:
        for p in points:
            xs = samples[(p, spec.label)]
            rows.append({"label": spec.label, "mode": spec.mode, "ratio": spec.ratio, "passages": p,
                         "context_tokens": mean(tokens[p]), "n": len(xs),
                         "ttft_median_s": statistics.median(xs), "ttft_p95_s": percentile(xs, 95)})
    return rows


def format_context(rows: list[dict]) -> str:
    """TTFT median (s): one line per mode, one column per passage count."""
    points = sorted({r["passages"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["passages"]): r for r in rows}
    lines = [f"{'passages':<20} " + " ".join(f"{p:>8}" for p in points),
             f"{'tokens':<20} " + " ".join(f"{by[(labels[0], p)]['context_tokens']:>8.0f}" for p in points)]
    for lab in labels:
        lines.append(f"{lab:<20} " + " ".join(f"{by[(lab, p)]['ttft_median_s']:>8.3f}" for p in points))
    return "\n".join(lines)
