"""The on-disk and remote form of a chunk: a safetensors file, never pickle.

Layout: one tensor per layer, `k.{l}` and `v.{l}` of shape [Hkv, T, D] in the storage dtype,
plus `k_scale` / `v_scale` of shape [L] float32 for fp8, and `sensitivity` of shape [T]
float32 when the chunk was precomputed with one (see engine/chunks.py). Readers of a layer range touch only
those tensors (the file is opened lazily with `safe_open`).

Header (`__metadata__`, all strings):
    format          "cacheblend.chunkkv"
    version         "1"
    key             the chunk key (a file under the wrong name is corrupt)
    shape           JSON [L, Hkv, T, D]
    num_layers      L
    num_tokens      T
    dtype           compute dtype to return ("float32" | "float16" | "bfloat16")
    storage_dtype   dtype of k.* / v.*
    checksum_algo   "crc32"
    checksums       JSON {tensor name: crc32 of its bytes, 8 hex digits}

Anything that disagrees with the header raises `CorruptBlob`; tiers drop such blobs.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable, Optional, Protocol

import safetensors
import safetensors.torch
import torch

from kvstore.quant import COMPUTE_DTYPES, STORAGE_DTYPES, StoredChunk, dtype_name

FORMAT = "cacheblend.chunkkv"
VERSION = "1"
_MAX_HEADER = 16 << 20  # far above any real header; guards the length prefix of remote blobs


class CorruptBlob(Exception):
    """A stored blob failed its header, shape or checksum check."""


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.contiguous().view(torch.uint8).numpy().data):08x}"


def _tensors(chunk: StoredChunk) -> dict[str, torch.Tensor]:
    keys, values = chunk.keys.cpu(), chunk.values.cpu()
    out: dict[str, torch.Tensor] = {}
    for l in range(chunk.num_layers):
        out[f"k.{l}"] = keys[l]  # [Hkv, T, D]
        out[f"v.{l}"] = values[l]
    if chunk.k_scale is not None and chunk.v_scale is not None:
        out["k_scale"] = chunk.k_scale.cpu()  # [L]
        out["v_scale"] = chunk.v_scale.cpu()
    if chunk.sensitivity is not None:
        out["sensitivity"] = chunk.sensitivity.cpu()  # [T]
    return out


def to_bytes(key: str, chunk: StoredChunk) -> bytes:
    """Serialize a whole stored chunk under `key`."""
    if not chunk.is_whole:
        raise ValueError("only a whole chunk can be serialized")
    tensors = _tensors(chunk)
    L, H, T, D = chunk.keys.shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "shape": json.dumps([L, H, T, D]),
        "num_layers": str(L),
        "num_tokens": str(T),
        "dtype": dtype_name(chunk.dtype),
        "storage_dtype": chunk.storage_dtype,
        "checksum_algo": "crc32",
        "checksums": json.dumps({name: _crc(t) for name, t in tensors.items()}, sort_keys=True),
    }
    return safetensors.torch.save(tensors, metadata=meta)


class _Source(Protocol):
    def metadata(self) -> Optional[dict[str, str]]: ...
    def keys(self) -> Iterable[str]: ...
    def get_tensor(self, name: str) -> torch.Tensor: ...


class _BytesSource:
    """A fully loaded blob (from Redis or S3) seen through the `safe_open` interface."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 8:
            raise CorruptBlob("blob shorter than its header length")
        n = int.from_bytes(data[:8], "little")
        if n > min(_MAX_HEADER, len(data) - 8):
            raise CorruptBlob("header length beyond the blob")
        header = json.loads(data[8:8 + n])
        self._meta = header.get("__metadata__") if isinstance(header, dict) else None
        self._tensors = safetensors.torch.load(data)

    def metadata(self) -> Optional[dict[str, str]]:
        return self._meta

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _decode(src: _Source, key: str, layers: Optional[range]) -> tuple[StoredChunk, int]:
    """Read `layers` (all if None) from `src`, checking it; returns the chunk and bytes read."""
    meta = src.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CorruptBlob("not a chunk KV blob of a known version")
    if meta.get("key") != key:
        raise CorruptBlob("blob stored under another key")
    shape = json.loads(meta["shape"])
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise CorruptBlob(f"bad shape {shape!r}")
    L, H, T, D = shape
    if int(meta["num_layers"]) != L or int(meta["num_tokens"]) != T or L == 0:
        raise CorruptBlob("layer or token count disagrees with shape")
    if meta.get("dtype") not in COMPUTE_DTYPES or meta.get("storage_dtype") not in STORAGE_DTYPES:
        raise CorruptBlob("unknown dtype")
    if meta.get("checksum_algo") != "crc32":
        raise CorruptBlob("unknown checksum")
    storage = STORAGE_DTYPES[meta["storage_dtype"]]
    fp8 = storage == torch.float8_e4m3fn
    checksums = json.loads(meta["checksums"])
    names = {f"{kv}.{l}" for l in range(L) for kv in "kv"} | ({"k_scale", "v_scale"} if fp8 else set())
    has_sensitivity = "sensitivity" in checksums
    names |= {"sensitivity"} if has_sensitivity else set()
    if set(src.keys()) != names or set(checksums) != names:
        raise CorruptBlob("tensor names disagree with the header")

    layers = range(L) if layers is None else layers
    if not (0 <= layers.start < layers.stop <= L) or layers.step != 1:
        raise IndexError(f"layers {layers} outside the chunk's {L} layers")
    nbytes = 0

    def read(name: str, want_shape: list[int], want_dtype: torch.dtype) -> torch.Tensor:
        nonlocal nbytes
        t = src.get_tensor(name)
        if list(t.shape) != want_shape or t.dtype != want_dtype:
            raise CorruptBlob(f"{name}: {list(t.shape)} {t.dtype}, header says {want_shape} {want_dtype}")
        if _crc(t) != checksums[name]:
            raise CorruptBlob(f"{name}: checksum mismatch")
        nbytes += t.nbytes
        return t

    ks = [read(f"k.{l}", [H, T, D], storage) for l in layers]
    vs = [read(f"v.{l}", [H, T, D], storage) for l in layers]
    # One layer needs no copy: [Hkv, T, D] -> [1, Hkv, T, D] is a view.
    keys = ks[0].unsqueeze(0) if len(ks) == 1 else torch.stack(ks)
    values = vs[0].unsqueeze(0) if len(vs) == 1 else torch.stack(vs)
    k_scale = v_scale = None
    if fp8:
        k_scale = read("k_scale", [L], torch.float32)[layers.start:layers.stop]
        v_scale = read("v_scale", [L], torch.float32)[layers.start:layers.stop]
    sensitivity = read("sensitivity", [T], torch.float32) if has_sensitivity else None
    dtype = COMPUTE_DTYPES[meta["dtype"]]
    return StoredChunk(keys, values, dtype, k_scale, v_scale, layers.start, L, sensitivity), nbytes


# What a malformed blob makes safetensors, json and int() raise.
_MALFORMED = (safetensors.SafetensorError, ValueError, KeyError, TypeError, RuntimeError)


def from_bytes(key: str, data: bytes, layers: Optional[range] = None) -> tuple[StoredChunk, int]:
    """Decode and check a blob; returns (chunk, bytes of tensors read).

    Raises CorruptBlob, or IndexError when `layers` lies outside the chunk.
    """
    try:
        return _decode(_BytesSource(data), key, layers)
    except CorruptBlob:
        raise
    except _MALFORMED as e:
        raise CorruptBlob(f"{type(e).__name__}: {e}") from e


def read_file(key: str, path: Path, layers: Optional[range] = None) -> tuple[StoredChunk, int]:
    """Read `layers` of the blob at `path` lazily; returns (chunk, bytes of tensors read).

    Raises CorruptBlob, FileNotFoundError, or IndexError when `layers` lies outside the chunk.
    """
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return _decode(f, key, layers)
    except (CorruptBlob, FileNotFoundError):
        raise
    except _MALFORMED as e:
        raise CorruptBlob(f"{type(e).__name__}: {e}") from e
