"""Exactness checks `bench gpu` runs on the device before it times anything.

attention: the selected-query path (scattered query positions over the whole fused cache, the
  exact causal mask) in the compute dtype against a float64 reference; whether it runs inside a
  fused SDPA kernel (only flash / memory-efficient / cuDNN allowed: a fallback to the unfused
  math path raises), and its time against the math path at a long context.
ratio_one: a blend that recomputes every token gives full prefill's first token and logits.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attention import CausalPlan, causal_attention

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """q [H, S, D] at q_pos; k, v [Hkv, N, D] -> [H, S, D] in float64, each query over keys <= its position."""
    H, Hkv, D = q.shape[0], k.shape[0], q.shape[2]
    k, v = (t.double().repeat_interleave(H // Hkv, 0) for t in (k, v))               # [H, N, D]
    s = q.double() @ k.transpose(1, 2) * D ** -0.5                                      # [H, S, N]
    hidden = torch.arange(k.shape[1], device=q.device)[None, :] > q_pos[:, None]        # [S, N]
    return torch.softmax(s.masked_fill(hidden, float("-inf")), -1) @ v


def _inputs(shape: dict, n_keys: int, ratio: float, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    H, Hkv, D = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    S = max(1, int(n_keys * ratio))
    q_pos = torch.randperm(n_keys - 1, generator=g, device=device)[:S - 1].sort().values
    q_pos = torch.cat([q_pos, torch.tensor([n_keys - 1], device=device)])              # the last token is always recomputed
    q = torch.randn(H, q_pos.numel(), D, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(Hkv, n_keys, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    return q, k, v, q_pos


def _median_ms(fn, device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


@torch.no_grad()
def attention_check(shape: dict, device: torch.device, dtype: torch.dtype, n_keys: int, timed_keys: int,
                    ratio: float = 0.15, repeat: int = 5, seed: int = 0) -> dict:
    q, k, v, q_pos = _inputs(shape, n_keys, ratio, device, dtype, seed)
    got = causal_attention(q, k, v, CausalPlan(q_pos, n_keys, dtype))
    max_err = (got.double() - reference_attention(q, k, v, q_pos)).abs().max().item()
    try:
        with sdpa_kernel(FUSED):
            causal_attention(q, k, v, CausalPlan(q_pos, n_keys, dtype))
        fused = True
    except RuntimeError:
        fused = False
    out = {"keys": n_keys, "queries": q_pos.numel(), "dtype": str(dtype).removeprefix("torch."),
           "max_abs_error_vs_float64": max_err, "fused_kernel": fused}

    q, k, v, q_pos = _inputs(shape, timed_keys, ratio, device, dtype, seed + 1)
    plan = CausalPlan(q_pos, timed_keys, dtype)
    out["timed_keys"] = timed_keys
    out["default_ms"] = _median_ms(lambda: causal_attention(q, k, v, plan), device, repeat)
    with sdpa_kernel([SDPBackend.MATH]):
        out["math_path_ms"] = _median_ms(lambda: causal_attention(q, k, v, plan), device, repeat)
    return out


@torch.no_grad()
def ratio_one_check(engine, segments: list, check_layer: int) -> dict:
    """Full prefill vs a blend at recompute ratio 1.0 over the same segments (chunk KV already stored)."""
    from engine.request import BlendParams
    from engine.segments import token_ids

    n = len(token_ids(segments)) + 1
    results = {}
    for label, blend in (("full_prefill", BlendParams(mode="full_prefill")),
                         ("ratio_1", BlendParams(mode="cacheblend", recompute_ratio=1.0, check_layers=[check_layer]))):
        engine.prefix_cache.clear()
        results[label] = engine.prefill(segments, blend, n).result.logits.float()
    engine.prefix_cache.clear()
    full, one = results["full_prefill"], results["ratio_1"]
    return {"first_token_equal": int(full.argmax()) == int(one.argmax()),
            "max_abs_logit_diff": (full - one).abs().max().item(), "logit_scale": full.abs().max().item()}
