"""`cacheblend bench selection`: which chunk tokens should CacheBlend recompute? (research)

For each MuSiQue question (the eval's prompt layout) this runs full prefill once, takes every
chunk token's true V deviation per layer (full-prefill V against the cached chunk V), and then
runs cacheblend at ratio r with the recomputed set chosen by different predictors, all with the
same number of tokens. KL is the first-token KL(full_prefill || run), as in `cacheblend eval`.

Predictors:
- value: the shipped signal's baseline, V deviation at the check layer (layer 1);
- sensitivity: the default signal (value pool, then the chunk's stored context sensitivity);
- oracle_L{a}-{b}: the true deviation summed over layers a..b (each layer normalised by its
  mean), which no real run can see before computing those layers: an upper bound that says
  which layers' deviation a predictor should aim at;
- pooled_oracle: the value pool, then oracle_L5-8 (what sensitivity approximates).

Oracle and pooled runs hand their ranking to the prefill (`token_scores`: the check layer ranks
its candidates by it instead of the KV deviation); the prefill is otherwise the engine's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from bench import dataset as ds
from bench.eval import add_question_args, select_records
from bench.eval_harness import Harness, eval_settings
from config import add_settings_flags
from engine.quality import first_token_kl
from engine.request import BlendParams
from engine.segments import spans
from engine.selection import num_selected, sensitivity_layers

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

WINDOWS = [(1, 1), (2, 4), (5, 8), (9, 14), (15, 29)]


def study(engine: LLMEngine, records: list[ds.Record], passages: int, ratio: float) -> dict[str, list[float]]:
    L = engine.model.cfg.num_layers
    s = sensitivity_layers(L)
    windows = list(dict.fromkeys([(a, b) for a, b in WINDOWS if b < L] + [(s.start, s.stop - 1)]))
    out: dict[str, list[float]] = {}
    value_only = BlendParams(mode="cacheblend", recompute_ratio=ratio, selection_signal="value", check_layers=[1])
    for rec in records:
        segs = ds.build_segments(engine, rec, passages)
        chunk_spans = [sp for sg, sp in zip(segs, spans(segs)) if sg.kind == "chunk"]
        cached_v = torch.cat([engine.ensure_chunk(sg).values for sg in segs if sg.kind == "chunk"], 2).float()
        engine.prefix_cache.clear()
        full = engine.prefill(segs, BlendParams(mode="full_prefill"), remember=False).result
        pos = torch.cat([torch.arange(s, e) for s, e in chunk_spans])
        dev = (full.cache.v[:, :, pos].float() - cached_v).pow(2).sum(dim=(1, 3))  # [L, n]
        dev = dev / dev.mean(dim=1, keepdim=True).clamp_min(1e-12)

        def kl(params: BlendParams, chunk_scores: Optional[torch.Tensor] = None) -> float:
            """KL against full prefill; `chunk_scores` [n] (chunk tokens in order): the ranking to keep by."""
            scores = None
            if chunk_scores is not None:
                scores = torch.full((full.cache.length,), float("-inf"))  # [N]: only chunk positions are candidates
                scores[pos] = chunk_scores
            engine.prefix_cache.clear()
            out = engine.prefill(segs, params, remember=False, token_scores=scores).result
            return first_token_kl(full.logits, out.logits)

        row = {"full_reuse": kl(BlendParams(mode="full_reuse")), "value": kl(value_only),
               "sensitivity": kl(BlendParams(mode="cacheblend", recompute_ratio=ratio, selection_signal="sensitivity",
                                             check_layers=[1]))}
        for a, b in windows:
            row[f"oracle_L{a}-{b}"] = kl(value_only, dev[a:b + 1].sum(0))
        pool = torch.zeros(pos.numel(), dtype=torch.bool)
        pool[torch.topk(dev[1], num_selected(engine.settings.sensitivity_pool, pos.numel())).indices] = True
        row["pooled_oracle"] = kl(value_only, torch.where(pool, dev[s.start:s.stop].sum(0), float("-inf")))
        for name, value in row.items():
            out.setdefault(name, []).append(value)
        print(f"q{rec.index}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    return out


def summarize(results: dict[str, list[float]]) -> list[dict]:
    reuse = results["full_reuse"]
    rows = []
    for name, kls in results.items():
        rows.append({"predictor": name, "kl": statistics.mean(kls), "vs_full_reuse": statistics.mean(kls) / statistics.mean(reuse),
                     "below_full_reuse": statistics.mean(float(a < b) for a, b in zip(kls, reuse)), "n": len(kls)})
    return rows


def run(args: argparse.Namespace) -> None:
    records = select_records(args)
    engine = Harness(eval_settings(args)).default
    rows = summarize(study(engine, records, args.passages, args.ratio))
    print(f"\n{'predictor':<16} {'KL':>8} {'vs reuse':>8} {'below':>6}")
    for r in rows:
        print(f"{r['predictor']:<16} {r['kl']:>8.4f} {r['vs_full_reuse']:>8.3f} {r['below_full_reuse']:>6.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"questions": [r.index for r in records], "passages": args.passages,
                                         "ratio": args.ratio, "rows": rows}, indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selection", help="research: which tokens to recompute (oracle deviations against the signals)")
    add_question_args(p, limit=16)
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--json", type=Path, default=None)
    add_settings_flags(p, fields=["model", "device", "dtype", "data_dir", "chunk_context", "sensitivity_pool", "kv_storage_dtype"])
    p.set_defaults(func=run)
