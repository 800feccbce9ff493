"""`cacheblend bench attention`: the engine's attention against the alternatives it was chosen over.

SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64), random inputs, one layer:
- causal prefill over all N tokens: torch's CPU flash kernel (SDPA) vs blocked attention on plain
  matmuls, each KV head's query heads stacked into one GEMM, exact softmax, vs `causal_attention`
  (the compiled kernel in bf16 on AVX512-BF16, else SDPA);
- selected queries (a share of the positions, scattered) over the whole cache with the exact
  causal mask: SDPA at several query-block sizes, and (bf16, AVX512-BF16) the compiled kernel
  that `causal_attention` takes there;
- one decode step's attention for a batch (`--decode-batch` sequences with `--decode-tokens` of
  context each, all 30 layers): the compiled kernel (engine/native.py) vs the torch ops.
Candidates interleaved round by round (the machine is shared); the median per candidate printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import attention, native
from engine.attention import CausalPlan, append_attend_torch, causal_attention, sdpa_blocks

H, HKV, D, LAYERS = 9, 3, 64, 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="attention kernels at one context length (microbenchmark)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6296)
    p.add_argument("--selected", type=float, default=0.16, help="share of positions queried in the masked case (default: %(default)s)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=512, help="context of each decoding sequence (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=run)


def blocked_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Causal attention from matmuls: q [H, N, D], k, v [Hkv, N, D] -> [H, N, D]; fp32 softmax."""
    Hq, N, Dh = q.shape
    G = Hq // k.shape[0]
    out = torch.empty_like(q)
    for start in range(0, N, block):
        stop = min(N, start + block)
        qb = q[:, start:stop].reshape(k.shape[0], G * (stop - start), Dh)            # [Hkv, G*B, D]
        s = torch.bmm(qb, k[:, :stop].transpose(1, 2)).float().mul_(1 / math.sqrt(Dh))  # [Hkv, G*B, stop]
        s = s.view(k.shape[0], G, stop - start, stop)
        s[..., start:].masked_fill_(torch.ones(stop - start, stop - start, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1).to(q.dtype).view(k.shape[0], G * (stop - start), stop)
        out[:, start:stop] = torch.bmm(p, v[:, :stop]).view(Hq, stop - start, Dh)
    return out


def decode_step_attention(op, dtype: torch.dtype, batch: int, tokens: int, g: torch.Generator):
    """A callable running one decode step's attention (every layer) for `batch` sequences."""
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    caches = [(rand(LAYERS, HKV, tokens + 1, D), rand(LAYERS, HKV, tokens + 1, D)) for _ in range(batch)]
    q, k_new, v_new = rand(H, batch, D) * D ** -0.5, rand(HKV, batch, D), rand(HKV, batch, D)
    out = torch.empty(batch, H, D, dtype=dtype)
    k_caches, v_caches = [c[0] for c in caches], [c[1] for c in caches]

    def step():
        for layer in range(LAYERS):
            op(q, k_new, v_new, k_caches, v_caches, [tokens] * batch, layer, out)
    return step


def run(args: argparse.Namespace) -> int:
    N = args.tokens
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(h, N, D, generator=g) for h in (H, HKV, HKV))
    sel = torch.sort(torch.randperm(N - 1, generator=g)[: int(args.selected * N) - 1]).values
    sel = torch.cat([sel, torch.tensor([N - 1])])                                      # the last token is always queried
    samples: dict[str, list[float]] = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
        qs = q[:, sel].contiguous()
        full = CausalPlan(torch.arange(N), N, dtype)
        plans = {}
        for b in (128, 256, 512, 1024):
            attention.QUERY_BLOCK = b
            plans[b] = CausalPlan(sel, N, dtype)
        attention.QUERY_BLOCK = 256
        cands = {"causal: SDPA flash": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                             enable_gqa=True)[0],
                 "causal: blocked matmul": lambda: blocked_matmul(q, k, v),
                 "causal: engine": lambda: causal_attention(q, k, v, full)}
        cands.update({f"selected: SDPA, {b}-query blocks": (lambda p=p: sdpa_blocks(qs, k, v, p)) for b, p in plans.items()})
        if dtype == torch.bfloat16 and native.blend_attend_op() is not None:
            out = torch.empty_like(qs)
            cands["selected: compiled bf16 kernel"] = lambda: native.blend_attend_op()(qs, k, v, sel, out, D ** -0.5)
        decode = f"decode step ({LAYERS} layers), batch {args.decode_batch} x {args.decode_tokens} tokens"
        cands[f"{decode}: torch ops"] = decode_step_attention(append_attend_torch, dtype, args.decode_batch, args.decode_tokens, g)
        if native.append_attend_op() is not None:
            cands[f"{decode}: compiled"] = decode_step_attention(native.append_attend_op(), dtype, args.decode_batch, args.decode_tokens, g)
        for _ in range(args.repeat):
            for label, fn in cands.items():
                t = time.perf_counter()
                fn()
                samples.setdefault(f"{name} {label}", []).append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{N} tokens, {sel.numel()} selected queries; median of {args.repeat} (s)")
    for label, s in med.items():
        print(f"  {label:<76} {s:8.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens": N, "selected": sel.numel(), "median_s": med, "samples_s": samples}, indent=2))
    return 0
