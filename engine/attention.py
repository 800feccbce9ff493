"""Exact causal attention for any set of query positions over a full KV cache.

A query at position p sees exactly the keys at positions <= p. When the queries are every
position, SDPA's own causal path is used. Otherwise the queries are taken in blocks: a block
attends only to keys up to its last position (so the causal half of the work is skipped, as a
flash kernel would), with an additive mask over just those keys. The masks depend only on the
query positions, so a `CausalPlan` builds them once and every layer with the same computed
tokens reuses them.

Measured at 6,296 tokens on a 2-core AVX2 CPU (`cacheblend bench attention`): torch's CPU flash
kernel (the SDPA calls below) beat blocked attention on plain matmuls with an exact softmax per
query block (2.5x slower in fp32, 50x in bf16 without native bf16 GEMMs: the [rows, keys] scores
leave the cache); for the selected queries it also beat folding a KV head's query heads into one
call's rows and splitting each block into an unmasked head and a masked tail merged by
log-sum-exp; 256 queries per block were within noise of the best of 128 to 1024 in both dtypes.

On a CPU with AVX512-BF16, bf16 attention goes to a compiled kernel instead, for selected rows
and every position alike (csrc/blend_attention.cpp: the flash recipe with bf16 products, fp32
scores and softmax): SDPA's CPU kernel computes in fp32 whatever the input, and was 57% of a
blend at that peak. With 9 heads over 3 KV heads, head dim 64 (`cacheblend bench attention`):
3.4x faster than the SDPA blocks below for 376 of 2,512 positions, 2.2x faster than SDPA's
causal path for all 2,512 (and all 6,296).

On CUDA the fused kernels that take a mask reject differing query and KV head counts, so SDPA
would fall back to its unfused math path; there each KV head's query heads are folded into the
rows of one attention call instead (`_fold_groups`). On an H200 (`bench gpu`, Mistral-7B shape,
bf16, 4,924 queries over 32,832 keys) that runs in cuDNN's fused kernel, 9x faster than the math
path; blocks of 512 queries beat 256 (13.1 ms) and 1,024 (7.8 ms) at 7.1 ms per layer: a block
of 256 gives the kernel too few tiles to fill the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine import native

QUERY_BLOCK = 256       # on the CPU (measured above)
CUDA_QUERY_BLOCK = 512  # on CUDA (measured, above)


@dataclass
class _Block:
    start: int            # first query row
    stop: int             # one past the last query row
    keys: int             # keys visible to the block: positions 0..keys-1
    mask: torch.Tensor    # [stop - start, keys] additive: 0 visible, -inf hidden
    folded: Optional[torch.Tensor] = None  # [G * (stop - start), keys]: the mask once per query head of a group


class CausalPlan:
    """Query blocks and masks for sorted query positions q_pos [S] over N keys."""

    def __init__(self, q_pos: torch.Tensor, num_keys: int, dtype: torch.dtype):
        self.q_pos = q_pos
        self.all_positions = q_pos.numel() == num_keys
        self.dtype = dtype
        self.block = CUDA_QUERY_BLOCK if q_pos.is_cuda else QUERY_BLOCK

    @functools.cached_property
    def blocks(self) -> list[_Block]:
        """The query blocks and their masks, built on first use (the compiled kernel needs none)."""
        q_pos, blocks = self.q_pos, []
        for start in range(0, q_pos.numel(), self.block):
            pos = q_pos[start:start + self.block]                                   # [B]
            keys = int(pos[-1]) + 1
            visible = torch.arange(keys, device=q_pos.device)[None, :] <= pos[:, None]  # [B, keys]
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=q_pos.device).masked_fill_(~visible, float("-inf"))
            blocks.append(_Block(start, start + pos.numel(), keys, mask))
        return blocks


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CausalPlan) -> torch.Tensor:
    """q: [H, S, D] at plan.q_pos; k, v: [Hkv, N, D] for positions 0..N-1 -> [H, S, D].

    Hkv may divide H (grouped-query attention).
    """
    kernel = _bf16_kernel(q, k, v)
    if kernel is not None:
        out = torch.empty_like(q)
        kernel(q, k, v, plan.q_pos, out, q.shape[2] ** -0.5)
        return out
    if plan.all_positions:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=q.shape[0] != k.shape[0])[0]
    return sdpa_blocks(q, k, v, plan)


def sdpa_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CausalPlan) -> torch.Tensor:
    """`causal_attention` for selected rows as SDPA calls, a query block each with its mask."""
    H, Hkv, D = q.shape[0], k.shape[0], q.shape[2]
    gqa = H != Hkv
    out = torch.empty_like(q)
    fold = gqa and _fold_groups(q)
    for b in plan.blocks:
        qb = q[:, b.start:b.stop]                                                  # [H, B, D]
        if fold:
            G, B = H // Hkv, b.stop - b.start
            if b.folded is None:
                b.folded = b.mask.repeat(G, 1)
            # head j * G + g, row i -> KV head j, row g * B + i
            o = F.scaled_dot_product_attention(qb.reshape(Hkv, G * B, D)[None], k[None, :, :b.keys], v[None, :, :b.keys],
                                               attn_mask=b.folded)[0]              # [Hkv, G * B, D]
            out[:, b.start:b.stop] = o.view(H, B, D)
        else:
            out[:, b.start:b.stop] = F.scaled_dot_product_attention(
                qb[None], k[None, :, :b.keys], v[None, :, :b.keys], attn_mask=b.mask, enable_gqa=gqa)[0]
    return out


def _bf16_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The compiled bf16 kernel for any sorted query positions (csrc/blend_attention.cpp), where
    it applies: CPU with AVX512-BF16, bf16, head dim 64, rows contiguous. Else None (SDPA)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[2] != 64:
        return None
    if any(t.stride(2) != 1 for t in (q, k, v)):
        return None
    return native.blend_attend_op()


def _fold_groups(q: torch.Tensor) -> bool:
    """Whether masked grouped-query attention folds its query heads into rows (CUDA, see above)."""
    return q.is_cuda


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One new query per head over its whole cache: q [H, D], already scaled by D^-0.5;
    k, v [Hkv, L, D] -> `out` [H, D] (contiguous), returned.

    Two small matmuls and an fp32 softmax: SDPA's flash kernel sets up tiles and per-thread
    buffers per call, which costs more than the attention itself for a single query.
    """
    H, D = q.shape
    Hkv = k.shape[0]
    s = torch.bmm(q.reshape(Hkv, H // Hkv, D), k.transpose(1, 2))                      # [Hkv, G, L]
    probs = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)
    torch.bmm(probs, v, out=out.view(Hkv, H // Hkv, D))                               # [Hkv, G, D]
    return out


def append_attend_torch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_caches: list[torch.Tensor],
                        v_caches: list[torch.Tensor], positions: list[int], layer: int, out: torch.Tensor) -> None:
    """A decode step's attention for a batch, as torch ops (the compiled op in engine/native.py
    does the same in one call): q [H, B, D] scaled; k_new, v_new [Hkv, B, D]; each sequence's
    caches [L, Hkv, capacity, D] get its new K/V at `positions[b]`; out [B, H, D]."""
    for b, p in enumerate(positions):
        k_caches[b][layer, :, p] = k_new[:, b]
        v_caches[b][layer, :, p] = v_new[:, b]
        decode_attention(q[:, b], k_caches[b][layer, :, : p + 1], v_caches[b][layer, :, : p + 1], out=out[b])
