"""`cacheblend bench decode`: one decode step of the real model, its GEMMs on packed or plain weights.

A decode step's projections are GEMMs of a few rows (one per sequence). On CPU `engine.model`
runs them on a copy of each weight in oneDNN's blocked layout (`pack_weight`), in fp32 and, where
oneDNN has bf16 kernels, in bf16. This times whole decode steps (`bench.decode_speed`) at each
`--batches` size, `--context` tokens per sequence, with the packed copies and without them (the
plain weights through F.linear), the two interleaved round by round, the fastest round printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.decode_speed import decode_prompts, decode_time
from bench.eval_harness import eval_settings
from engine.loader import load_model
from engine.model import Transformer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode step time, projections on packed vs plain weights (microbenchmark)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,16", help="sequences decoded together, one case each (default: %(default)s)")
    p.add_argument("--context", type=int, default=2500, help="prompt tokens of each sequence (default: %(default)s)")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per round (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=run)


def _set_packed(model: Transformer, packed: list[dict], on: bool) -> None:
    for lw, copies in zip(model.layers, packed):
        lw.packed.clear()
        if on:
            lw.packed.update(copies)


def run(args: argparse.Namespace) -> int:
    model, _, _ = load_model(eval_settings())
    packed = [dict(lw.packed) for lw in model.layers]
    if not packed[0]:
        print(f"no packed weights for {model.dtype} on this device: nothing to compare")
        return 1
    ids = list(range(1000, 1000 + 2 * args.context))  # token IDs: a step's cost does not depend on them
    batches = [int(b) for b in args.batches.split(",")]
    samples: dict[str, list[float]] = {}
    for batch in batches:
        prompts = decode_prompts(ids, batch, args.context)
        for _ in range(args.repeat):
            for name, on in (("plain", False), ("packed", True)):
                _set_packed(model, packed, on)
                samples.setdefault(f"batch {batch}: {name}", []).append(decode_time(model, prompts, args.steps) / args.steps)
    best = {k: min(v) for k, v in samples.items()}
    print(f"{model.cfg.num_layers} layers, {model.dtype}, {args.context}-token contexts; ms per decode step, best of {args.repeat}")
    for batch in batches:
        plain, fast = best[f"batch {batch}: plain"], best[f"batch {batch}: packed"]
        print(f"  batch {batch:>3}   plain {plain * 1e3:7.1f}   packed {fast * 1e3:7.1f}   packed is {plain / fast:5.2f}x as fast")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dtype": str(model.dtype), "context": args.context, "best_s": best, "samples_s": samples}, indent=2))
    return 0
