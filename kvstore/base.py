"""The narrow interface the engine reads chunk KV through.

A chunk's KV is the per-layer K (before RoPE, so it can be placed at any position) and V of
its tokens, computed with the chunk alone under the engine's precompute convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch


@dataclass
class ChunkKV:
    keys: torch.Tensor    # [L, Hkv, T, D], pre-RoPE
    values: torch.Tensor  # [L, Hkv, T, D]
    first_layer: int = 0  # layer index of keys[0] (a layer-range read starts past 0)
    tier: str = ""        # where a read found it ("device", "cpu", "disk", "redis", "s3", "computed")
    sensitivity: Optional[torch.Tensor] = None  # [T] float32: how much each token's KV moves with its context

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (0 if self.sensitivity is None else self.sensitivity.nbytes)


class ChunkStore(Protocol):
    def contains(self, key: str) -> bool: ...

    def get(self, key: str, layers: Optional[range] = None) -> Optional[ChunkKV]:
        """KV of `key` (all layers, or the given range) in compute-ready float tensors, or None."""

    def get_or_compute(self, key: str, compute: Callable[[], ChunkKV]) -> ChunkKV:
        """Read `key`; on a miss everywhere run `compute` once (single-flight) and store it."""

    def put(self, key: str, kv: ChunkKV) -> None: ...

    def delete(self, key: str) -> bool: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...
