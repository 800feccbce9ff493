"""Chunk keys: content addresses for chunk KV.

A key is the sha256 (64 lowercase hex characters) of everything that determines a chunk's KV:
its token ids, the model, the KV dtype and the precompute convention, plus an optional salt
(a tenant's, or a request's `cache_salt`) that makes the same text a different entry per
salt; an empty salt leaves the key as it was before salts existed. Keys arrive from
clients as chunk IDs, so every tier checks them with `check_key` before touching storage.

Files named by key (disk tier blobs, registry records) live at `<root>/<key[:2]>/<key><suffix>`:
256 shard folders keep any one folder small.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

KEY_RE = re.compile(r"^[0-9a-f]{64}\Z")

_DOMAIN = b"cacheblend-chunk-key-v1\0"


def _field(h: "hashlib._Hash", text: str) -> None:
    # Length-prefixed so ("ab", "c") and ("a", "bc") hash differently.
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def chunk_key(
    token_ids: Union[Sequence[int], torch.Tensor],
    model_fingerprint: str,
    kv_dtype: str,
    convention: str,
    salt: str = "",
) -> str:
    """Hex sha256 key of a chunk's tokens under a model, KV dtype, precompute convention and salt."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1).cpu()
    h = hashlib.sha256(_DOMAIN)
    _field(h, model_fingerprint)
    _field(h, kv_dtype)
    _field(h, convention)
    h.update(ids.numel().to_bytes(8, "little"))
    h.update(ids.numpy().astype("<i8").tobytes())
    if salt:  # hashed in only when set, so unsalted keys (stored KV, chunk IDs) stay valid
        _field(h, salt)
    return h.hexdigest()


def is_key(key: object) -> bool:
    return isinstance(key, str) and KEY_RE.match(key) is not None


def check_key(key: object) -> str:
    """Return `key` if it is a well-formed chunk key, else raise ValueError."""
    if not is_key(key):
        raise ValueError(f"invalid chunk key: {str(key)[:80]!r}")
    return key  # type: ignore[return-value]


def shard_path(root: Path, key: str, suffix: str) -> Path:
    """Where the file of `key` lives under `root`; ValueError for a malformed key."""
    check_key(key)
    return root / key[:2] / f"{key}{suffix}"


def shard_files(root: Path, suffix: str) -> Iterator[tuple[str, Path]]:
    """(key, path) of every file laid out by `shard_path` under `root`, skipping any other name."""
    for path in root.glob(f"*/*{suffix}"):
        key = path.name[: -len(suffix)]
        if is_key(key) and path.parent.name == key[:2]:
            yield key, path
