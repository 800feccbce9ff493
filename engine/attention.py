"""Exact causal attention for any set of query positions over a full KV cache.

A query at position p sees exactly the keys at positions <= p. When the queries are every
position, SDPA's own causal path is used. Otherwise the queries are taken in blocks: a block
attends only to keys up to its last position (so the causal half of the work is skipped, as a
flash kernel would), with an additive mask over just those keys. The masks depend only on the
query positions, so a `CausalPlan` builds them once and every layer with the same computed
tokens reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUERY_BLOCK = 256


@dataclass
class _Block:
    start: int            # first query row
    stop: int             # one past the last query row
    keys: int             # keys visible to the block: positions 0..keys-1
    mask: torch.Tensor    # [stop - start, keys] additive: 0 visible, -inf hidden


class CausalPlan:
    """Query blocks and masks for sorted query positions q_pos [S] over N keys."""

    def __init__(self, q_pos: torch.Tensor, num_keys: int, dtype: torch.dtype):
        self.q_pos = q_pos
        self.all_positions = q_pos.numel() == num_keys
        self.blocks: list[_Block] = []
        if self.all_positions:
            return
        for start in range(0, q_pos.numel(), QUERY_BLOCK):
            pos = q_pos[start:start + QUERY_BLOCK]                               # [B]
            keys = int(pos[-1]) + 1
            visible = torch.arange(keys, device=q_pos.device)[None, :] <= pos[:, None]  # [B, keys]
            mask = torch.zeros(visible.shape, dtype=dtype, device=q_pos.device).masked_fill_(~visible, float("-inf"))
            self.blocks.append(_Block(start, start + pos.numel(), keys, mask))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CausalPlan) -> torch.Tensor:
    """q: [H, S, D] at plan.q_pos; k, v: [Hkv, N, D] for positions 0..N-1 -> [H, S, D].

    Hkv may divide H (grouped-query attention).
    """
    gqa = q.shape[0] != k.shape[0]
    if plan.all_positions:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=gqa)[0]
    out = torch.empty_like(q)
    for b in plan.blocks:
        out[:, b.start:b.stop] = F.scaled_dot_product_attention(
            q[None, :, b.start:b.stop], k[None, :, :b.keys], v[None, :, :b.keys], attn_mask=b.mask, enable_gqa=gqa
        )[0]
    return out
