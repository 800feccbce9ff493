"""HKVD selection: the chunk tokens whose fresh KV deviates most from their cached KV."""

from __future__ import annotations

import math

import torch


def kv_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """fresh, cached: [Hkv, M, D] -> [M] squared L2 distance per token over heads and dims."""
    return (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2))


def num_selected(ratio: float, num_chunk_tokens: int) -> int:
    """How many chunk tokens a check layer keeps: ceil(r * n), computed without float fuzz."""
    return min(num_chunk_tokens, math.ceil(round(ratio * num_chunk_tokens, 9)))


def select_hkvd(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """deviation: [M] -> indices [k] of the k largest, in ascending index order."""
    if k >= deviation.numel():
        return torch.arange(deviation.numel(), device=deviation.device)
    return torch.topk(deviation, k, sorted=False).indices.sort().values
