"""Crash-safe file writes: a reader sees the old file, the new file, or nothing, never half."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_PREFIX = ".tmp."


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_temp_files(root: Path, sharded: bool = True) -> int:
    """Delete temp files an interrupted `atomic_write` left in `root`'s subfolders (`root`
    itself when not `sharded`); returns how many.

    Only safe while no other process writes under `root` (one process owns a store folder).
    """
    removed = 0
    for tmp in root.glob(f"*/{TEMP_PREFIX}*" if sharded else f"{TEMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
