"""Disk full on the KV disk path (a small tmpfs, filled), and the scan that checks what a disk
tier folder holds: every chunk file read back with its checksums, temp files counted."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.faults import Query, Suite
from bench.faults_client import Tally, healthy, metric
from kvstore import serialize
from kvstore.atomic import TEMP_PREFIX
from kvstore.keys import shard_files
from kvstore.tier_disk import SUFFIX

# Left free after filling: less than one chunk, so writes fail part-way through a file.
SLIVER_BYTES = 256 << 10


@dataclass
class DiskScan:
    files: dict[str, Path]  # key -> chunk file
    corrupt: list[str]      # keys whose file fails its header or checksum check
    temps: int              # temp files of writes that never finished


def scan_kv(root: Path) -> DiskScan:
    """Read back every chunk file under `root` (only while no server owns the folder, or it is idle)."""
    files = dict(shard_files(root, SUFFIX))
    corrupt = []
    for key, path in files.items():
        try:
            serialize.read_file(key, path)
        except (serialize.CorruptBlob, FileNotFoundError):
            corrupt.append(key)
    return DiskScan(files, corrupt, sum(1 for _ in root.glob(f"*/{TEMP_PREFIX}*")))


def _mount_tmpfs(path: Path, size_bytes: int) -> str:
    """Mount a tmpfs of `size_bytes` at `path`; '' or why it could not be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return "" if done.returncode == 0 else f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip()}"


def _fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full, then free SLIVER_BYTES; bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written, block = 0, b"\0" * (1 << 20)
    try:
        while True:
            written += os.write(fd, block)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(path, max(0, written - SLIVER_BYTES))
    return written


async def _wait(probe, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        await asyncio.sleep(0.2)
    return False


def _texts(queries: list[Query]) -> list[str]:
    return list(dict.fromkeys(t for q in queries for t in q.texts))


async def disk_full(suite: Suite, tally: Tally) -> None:
    """Chunks registered while the disk is full: the writes fail (counted), requests answer as one
    by one, no file or temp file stays; once space returns, new chunks land, every file verifies,
    and a restarted server reads them back (and recomputes the others) answering as one by one."""
    ref = await suite.reference(tally)
    k = max(1, min(4, len(suite.queries) // 2))
    full, later = suite.queries[:k], suite.queries[k:2 * k]
    mount = suite.workdir / "tmpfs"
    reason = _mount_tmpfs(mount, (len(_texts(full + later)) + 4) * ref.chunk_bytes * 2)
    if reason:
        tally.skipped = reason
        return
    try:
        await _while_full(suite, tally, ref, mount / "kv", full, later)
        await _cold_restart(suite, tally, ref, mount / "kv", full + later)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


async def _while_full(suite: Suite, tally: Tally, ref, kv: Path, full: list[Query], later: list[Query]) -> None:
    with suite.server("disk", kv_disk_path=kv) as (url, _):
        filler = kv.parent / "filler"
        _fill(filler)
        errors = lambda: metric(url, "cacheblend:kv_remote_errors_total", tier="disk")  # noqa: E731
        before = errors()
        async with suite.client(url) as client:
            await suite.register_all(client, tally, full)
            wanted = len(_texts(full))
            tally.check("write_errors_counted", await _wait(lambda: errors() - before >= wanted),
                        f"{errors() - before:.0f} disk write errors for {wanted} chunks")
            await suite.warm(client, ref.ids)
            await suite.round(client, tally, ref, suite.picks_of(full))
            found = scan_kv(kv)
            tally.check("nothing_left_while_full", not found.files and not found.temps,
                        f"{len(found.files)} files, {found.temps} temp files")
            filler.unlink()
            await suite.register_all(client, tally, later)
            tally.check("writes_land_after_space_returns",
                        await _wait(lambda: len(scan_kv(kv).files) >= len(_texts(later))))
        found = scan_kv(kv)
        tally.check("files_verify", not found.corrupt and not found.temps,
                    f"corrupt {found.corrupt}, {found.temps} temp files")
        tally.survived(1, tally.ok and healthy(url))


async def _cold_restart(suite: Suite, tally: Tally, ref, kv: Path, queries: list[Query]) -> None:
    """The same state, nothing in memory: chunks on disk are read back (verified), the ones whose
    writes failed are recomputed from the registry; answers as one by one."""
    with suite.server("disk", kv_disk_path=kv) as (url, _):
        async with suite.client(url) as client:
            await suite.register_all(client, tally, queries)  # loads (verified) or recomputes and stores
            await suite.warm(client, ref.ids)
            await suite.round(client, tally, ref, suite.picks_of(queries))
        tally.check("read_back_from_disk", metric(url, "cacheblend:kv_hits_total", tier="disk") > 0)
        tally.check("no_corrupt_blob", metric(url, "cacheblend:kv_corrupt_blobs_total") == 0)
