"""Storage dtypes: converting chunk KV between the compute dtype and the stored form.

Storage is independent of compute: a float32 model can keep its chunks in float16, and any
model can keep them in float8_e4m3fn with one scale per layer (amax / 448, separately for K
and V) so the largest value of each layer maps to fp8's largest finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvstore.base import ChunkKV

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
_FP16_MAX = torch.finfo(torch.float16).max


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_per_token_per_layer(storage_dtype: str, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in one layer when stored as `storage_dtype`.

    fp8 adds two float32 scales per layer per chunk, which is not per token and not counted.
    """
    itemsize = torch.empty((), dtype=STORAGE_DTYPES[storage_dtype]).element_size()
    return 2 * num_kv_heads * head_dim * itemsize


@dataclass
class StoredChunk:
    """Chunk KV in its storage form, as tiers hold it.

    `dtype` is the compute dtype `put` received; `get` converts back to it.
    """

    keys: torch.Tensor                      # [L, Hkv, T, D] storage dtype
    values: torch.Tensor                    # [L, Hkv, T, D] storage dtype
    dtype: torch.dtype                      # compute dtype to return
    k_scale: Optional[torch.Tensor] = None  # [L] float32, fp8 only
    v_scale: Optional[torch.Tensor] = None  # [L] float32, fp8 only
    first_layer: int = 0                    # layer index of keys[0]
    total_layers: int = 0                   # layers of the whole chunk
    sensitivity: Optional[torch.Tensor] = None  # [T] float32, kept with every layer range

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def is_whole(self) -> bool:
        return self.first_layer == 0 and self.num_layers == self.total_layers

    @property
    def nbytes(self) -> int:
        n = self.keys.nbytes + self.values.nbytes
        if self.k_scale is not None and self.v_scale is not None:
            n += self.k_scale.nbytes + self.v_scale.nbytes
        if self.sensitivity is not None:
            n += self.sensitivity.nbytes
        return n

    @property
    def storage_dtype(self) -> str:
        return dtype_name(self.keys.dtype)

    def layers(self, layers: range) -> "StoredChunk":
        """Views of `layers` (absolute layer indices) of this chunk; IndexError outside it."""
        a, b = layers.start - self.first_layer, layers.stop - self.first_layer
        if not (0 <= a < b <= self.num_layers) or layers.step != 1:
            raise IndexError(f"layers {layers} outside the chunk's {self.total_layers} layers")
        return StoredChunk(
            self.keys[a:b], self.values[a:b], self.dtype,
            None if self.k_scale is None else self.k_scale[a:b],
            None if self.v_scale is None else self.v_scale[a:b],
            layers.start, self.total_layers, self.sensitivity,
        )

    def to(self, device: torch.device, pin_memory: bool = False) -> "StoredChunk":
        """Copy to `device` (pinned host memory if asked); self when already there."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device != device:
                t = t.to(device)
            if pin_memory and not t.is_pinned():
                t = t.pin_memory()
            return t

        k_scale = None if self.k_scale is None else move(self.k_scale)
        v_scale = None if self.v_scale is None else move(self.v_scale)
        sensitivity = None if self.sensitivity is None else move(self.sensitivity)
        return StoredChunk(move(self.keys), move(self.values), self.dtype, k_scale, v_scale,
                           self.first_layer, self.total_layers, sensitivity)


def _amax_scale(x: torch.Tensor) -> torch.Tensor:
    # x: [L, Hkv, T, D] -> [L] float32; an all-zero layer gets scale 1 to avoid dividing by 0.
    amax = x.abs().amax(dim=(1, 2, 3)).float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamp because float8_e4m3fn has no inf: rounding past 448 would give NaN.
    return (x.float() / scale.view(-1, 1, 1, 1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def encode(kv: ChunkKV, storage_dtype: str) -> StoredChunk:
    """Convert a whole chunk's KV to `storage_dtype` (on the tensors' own device).

    The result never shares memory with `kv`, so callers may keep using their tensors.
    """
    if kv.first_layer != 0:
        raise ValueError("only a whole chunk (first_layer 0) can be stored")
    if kv.keys.shape != kv.values.shape or kv.keys.dim() != 4:
        raise ValueError(f"keys {tuple(kv.keys.shape)} and values {tuple(kv.values.shape)} must both be [L, Hkv, T, D]")
    if kv.keys.dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"unsupported compute dtype {kv.keys.dtype}")
    target = STORAGE_DTYPES[storage_dtype]
    L, T = kv.keys.shape[0], kv.keys.shape[2]
    sensitivity = None
    if kv.sensitivity is not None:
        if tuple(kv.sensitivity.shape) != (T,):
            raise ValueError(f"sensitivity {tuple(kv.sensitivity.shape)} must be [T] = [{T}]")
        sensitivity = kv.sensitivity.to(dtype=torch.float32, copy=True)
    if target == torch.float8_e4m3fn:
        ks, vs = _amax_scale(kv.keys), _amax_scale(kv.values)
        return StoredChunk(_quantize_fp8(kv.keys, ks).contiguous(), _quantize_fp8(kv.values, vs).contiguous(),
                           kv.keys.dtype, ks, vs, 0, L, sensitivity)

    def cast(x: torch.Tensor) -> torch.Tensor:
        if target == torch.float16 and x.dtype != torch.float16:
            x = x.clamp(-_FP16_MAX, _FP16_MAX)  # keep out-of-range values finite
        return x.to(dtype=target, memory_format=torch.contiguous_format, copy=True)

    return StoredChunk(cast(kv.keys), cast(kv.values), kv.keys.dtype, None, None, 0, L, sensitivity)


def decode(chunk: StoredChunk, device: torch.device, tier: str) -> ChunkKV:
    """Compute-dtype ChunkKV on `device` from a stored (possibly partial) chunk.

    The copy to `device` happens in the storage dtype (fewer bytes over PCIe), then converts.
    Never returns tensors that share memory with the stored ones.
    """
    non_blocking = device.type == "cuda" and chunk.keys.is_pinned()

    def restore(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        y = x.to(device, non_blocking=non_blocking)
        if scale is not None:
            # [L, Hkv, T, D] * [L, 1, 1, 1]
            y = (y.float() * scale.to(device, non_blocking=non_blocking).view(-1, 1, 1, 1)).to(chunk.dtype)
        else:
            y = y.to(chunk.dtype)
        return y.clone() if y.data_ptr() == x.data_ptr() else y

    sensitivity = None if chunk.sensitivity is None else chunk.sensitivity.to(device, copy=True)
    return ChunkKV(restore(chunk.keys, chunk.k_scale), restore(chunk.values, chunk.v_scale), chunk.first_layer, tier,
                   sensitivity)
