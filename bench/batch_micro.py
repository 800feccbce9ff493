"""`cacheblend bench batch`: would batching several requests' blend prefills pay on this device?

After the selection a blend computes only its kept rows, layer by layer, each request over its
own fused cache. Batching `--requests` such prefills (vLLM's way) would run every layer's
projections and MLP once on all their rows concatenated; attention stays per request (each has
its own cache). This times both on the real model for all layers, the candidates interleaved
round by round, the median printed:
- separate: each request's rows through the layer on their own (what the engine does);
- batched: one QKV GEMM and one o-proj + MLP for all requests' rows, attention per request.
`--rows` are the rows per request: a whole blend's kept rows (15% of 6,300) or the pieces a
sliced step computes. The caches hold random K/V: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.eval_harness import eval_settings
from engine.attention import CausalPlan, causal_attention
from engine.loader import load_model
from engine.model import Transformer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="batched vs separate blend prefills on the real model (microbenchmark)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6300, help="prompt length of each request (default: %(default)s)")
    p.add_argument("--rows", default="945,256,64", help="computed rows per request, one case each (default: %(default)s)")
    p.add_argument("--requests", default="2,4", help="requests prefilled together, one case each (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=run)


class _Prefill:
    """One request's rows after the selection: hidden states, positions, its own fused cache."""

    def __init__(self, model: Transformer, tokens: int, rows: int, g: torch.Generator):
        c = model.cfg
        pos = torch.sort(torch.randperm(tokens - 1, generator=g)[: rows - 1]).values
        self.pos = torch.cat([pos, torch.tensor([tokens - 1])])                      # [R], the last token always
        self.h = model.embed(torch.randint(c.vocab_size, (rows,), generator=g))      # [R, hidden]
        shape = (c.num_layers, c.num_kv_heads, tokens, c.head_dim)
        self.k, self.v = (torch.randn(shape, generator=g).to(model.dtype) for _ in range(2))
        self.plan = CausalPlan(self.pos, tokens, model.dtype)
        self.N = tokens

    def attend(self, model: Transformer, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [H, R, D], k, v [Hkv, R, D] pre-RoPE -> attention output [H, R, D] (K/V written)."""
        self.k[layer][:, self.pos] = model.rotate(k, self.pos, self.N)
        self.v[layer][:, self.pos] = v
        return causal_attention(model.rotate(q, self.pos, self.N), self.k[layer], self.v[layer], self.plan)


@torch.inference_mode()
def separate(model: Transformer, prefills: list[_Prefill]) -> torch.Tensor:
    """-> every request's last-layer hidden states, concatenated [sum R, hidden]."""
    out = []
    for p in prefills:
        h = p.h
        for layer in range(model.cfg.num_layers):
            h = model.finish_layer(layer, h, p.attend(model, layer, *model.qkv(layer, h)))
        out.append(h)
    return torch.cat(out)


@torch.inference_mode()
def batched(model: Transformer, prefills: list[_Prefill]) -> torch.Tensor:
    """The same as `separate`, the requests' rows in one GEMM per projection."""
    sizes = [p.pos.numel() for p in prefills]
    h = torch.cat([p.h for p in prefills])                                          # [sum R, hidden]
    for layer in range(model.cfg.num_layers):
        q, k, v = model.qkv(layer, h)
        attn = torch.cat([p.attend(model, layer, qi, ki, vi)
                          for p, qi, ki, vi in zip(prefills, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))], dim=1)
        h = model.finish_layer(layer, h, attn)
    return h


def run(args: argparse.Namespace) -> int:
    model, _, _ = load_model(eval_settings())
    g = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {}
    cases = [(r, n) for r in map(int, args.rows.split(",")) for n in map(int, args.requests.split(","))]
    for rows, n in cases:
        prefills = [_Prefill(model, args.tokens, rows, g) for _ in range(n)]
        for _ in range(args.repeat):
            for name, fn in (("separate", separate), ("batched", batched)):
                t = time.perf_counter()
                fn(model, prefills)
                samples.setdefault(f"{n} x {rows} rows: {name}", []).append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{model.cfg.num_layers} layers, {args.tokens}-token prompts, {model.dtype}; median of {args.repeat} (s)")
    for rows, n in cases:
        s, b = med[f"{n} x {rows} rows: separate"], med[f"{n} x {rows} rows: batched"]
        print(f"  {n} requests x {rows:>4} rows   separate {s:7.3f}   batched {b:7.3f}   batched is {s / b:5.2f}x as fast")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens": args.tokens, "median_s": med, "samples_s": samples}, indent=2))
    return 0
