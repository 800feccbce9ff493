"""Tests of the tiered chunk-KV store, its registry and the layer prefetcher.

Redis and S3 are real: a redis-server process and a moto server on loopback (bench/services.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import pytest
import redis
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from config.settings import Settings
from kvstore import (ChunkKV, ChunkMissing, ChunkRegistry, LayerPrefetcher, TieredStore, build_store,
                     bytes_per_token_per_layer, check_key, chunk_key)
from kvstore import serialize
from kvstore.atomic import TEMP_PREFIX
from kvstore.keys import shard_files, shard_path
from kvstore.lru import LRU
from kvstore.policy import copy_targets, write_back_targets
from kvstore.tier_base import OnEvict, Payload, Pinned, Tier
from kvstore.tier_disk import DiskTier
from kvstore.tier_memory import MemoryTier
from kvstore.tier_redis import KEY_PREFIX, RedisTier
from kvstore.tier_s3 import S3Tier
from bench.services import MotoServer, RedisServer, redis_available, start_moto, start_redis

L, H, T, D = 4, 2, 16, 8
FP16_CHUNK = 2 * L * H * T * D * 2  # bytes of one chunk's K and V in float16

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")


def make_kv(seed: int, dtype: torch.dtype = torch.float32) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(L, H, T, D, generator=g).to(dtype), torch.randn(L, H, T, D, generator=g).to(dtype))


def key_of(i: int, fingerprint: str = "model-a") -> str:
    return chunk_key(list(range(i, i + T)), fingerprint, "float32", "sink")


def assert_close(a: ChunkKV, b: ChunkKV, atol: float = 1e-2) -> None:
    assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
    assert a.keys.dtype == b.keys.dtype
    torch.testing.assert_close(a.keys, b.keys, atol=atol, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=atol, rtol=0)


def make_store(tmp_path: Path, cpu: int = 1 << 20, disk: int = 1 << 20, storage: str = "float16",
               write: str = "through", extra: Optional[list[Tier]] = None, disk_dir: str = "kv") -> TieredStore:
    tiers: list[Tier] = []
    if cpu:
        tiers.append(MemoryTier("cpu", cpu, torch.device("cpu")))
    if disk:
        tiers.append(DiskTier(tmp_path / disk_dir, disk))
    return TieredStore(tiers + (extra or []), storage, "cpu", write)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def blob_path(tmp_path: Path, key: str, disk_dir: str = "kv") -> Path:
    return tmp_path / disk_dir / key[:2] / f"{key}.safetensors"


def from_cpu_then_disk(s: TieredStore, key: str) -> Iterator[ChunkKV]:
    """The chunk as read from the cpu tier, then (dropped from it) as read from the disk tier."""
    s.flush()  # the disk write lands in the background
    for source in ("cpu", "disk"):
        if source == "disk":
            s.tiers[0].remove(key)
        got = s.get(key)
        assert got is not None and got.tier == source
        yield got


def assert_stream_promotes(s: TieredStore, key: str, kv: ChunkKV, tier: str) -> None:
    """Layers read one by one come from `tier`; once the stream ends the whole chunk is in cpu."""
    for l in range(L):
        part = s.get(key, range(l, l + 1))
        assert part is not None and part.tier == tier
    s.flush()
    got = s.get(key)
    assert got is not None and got.tier == "cpu"
    assert_close(got, kv)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    s = make_store(tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server not installed")
    with start_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with start_moto() as server:
        server.create_bucket("kvstore-test")
        yield server


@pytest.fixture
def aws_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    return moto_server


# --- keys and dtypes ----------------------------------------------------------------------

def test_chunk_key_covers_all_inputs_and_is_validated() -> None:
    base = chunk_key([1, 2, 3], "m", "float32", "sink")
    assert base == chunk_key(torch.tensor([1, 2, 3]), "m", "float32", "sink")
    variants = {chunk_key([1, 2, 4], "m", "float32", "sink"), chunk_key([1, 2, 3], "m2", "float32", "sink"),
                chunk_key([1, 2, 3], "m", "bfloat16", "sink"), chunk_key([1, 2, 3], "m", "float32", "prefix"),
                chunk_key([1, 2, 3, 0], "m", "float32", "sink")}
    assert base not in variants and len(variants) == 5
    assert check_key(base) == base
    for bad in ["../../etc/passwd", base.upper(), base[:-1], base + "0", base + "\n", "", None]:
        with pytest.raises(ValueError):
            check_key(bad)


def test_invalid_key_never_touches_storage(store: TieredStore) -> None:
    with pytest.raises(ValueError):
        store.get("../" + "a" * 61)
    with pytest.raises(ValueError):
        store.put("a" * 63 + "/", make_kv(0))


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_storage_dtype_round_trip(tmp_path: Path, storage: str, compute: torch.dtype) -> None:
    kv = make_kv(1, compute)
    with make_store(tmp_path, storage=storage) as s:
        s.put(key_of(0), kv)
        for got in from_cpu_then_disk(s, key_of(0)):
            assert got.keys.dtype == compute and got.keys.shape == (L, H, T, D)
            for want, have in ((kv.keys, got.keys), (kv.values, got.values)):
                err = (want.float() - have.float()).abs()
                amax = want.float().abs().amax(dim=(1, 2, 3)).view(L, 1, 1, 1)
                if storage == "float8_e4m3fn":
                    # 3 mantissa bits: relative error at most 2^-4 of the layer's largest value.
                    assert bool((err <= amax / 16 + 1e-6).all())
                    assert err.mean() < 0.05
                elif storage == "float32" or storage == str(compute).removeprefix("torch."):
                    assert torch.equal(want, have)
                else:
                    assert bool((err <= amax / 128).all())


def test_fp8_halves_bytes_per_token() -> None:
    sizes = {d: bytes_per_token_per_layer(d, H, D) for d in ("float32", "float16", "bfloat16", "float8_e4m3fn")}
    assert sizes == {"float32": 2 * H * D * 4, "float16": 2 * H * D * 2, "bfloat16": 2 * H * D * 2,
                     "float8_e4m3fn": 2 * H * D}
    assert sizes["float8_e4m3fn"] * 2 == sizes["float16"]


def test_fp8_tier_bytes_are_half_of_fp16(tmp_path: Path) -> None:
    used = {}
    for storage in ("float16", "float8_e4m3fn"):
        with make_store(tmp_path, disk=0, storage=storage) as s:
            s.put(key_of(0), make_kv(0))
            used[storage] = s.stats()["cpu"]["bytes_used"]
    scales = 2 * L * 4  # one float32 scale per layer for K and for V
    assert used["float8_e4m3fn"] - scales == used["float16"] // 2


def test_layer_range_reads(tmp_path: Path) -> None:
    kv = make_kv(2)
    with make_store(tmp_path, cpu=0) as disk_only, make_store(tmp_path, disk=0) as cpu_only:
        for s, tier in ((disk_only, "disk"), (cpu_only, "cpu")):
            s.put(key_of(0), kv)
            s.flush()  # read from the file, not from the write on its way
            part = s.get(key_of(0), range(1, 3))
            assert part is not None and part.tier == tier and part.first_layer == 1
            assert_close(part, ChunkKV(kv.keys[1:3], kv.values[1:3]))
            with pytest.raises(IndexError):
                s.get(key_of(0), range(2, L + 1))
            with pytest.raises(ValueError):
                s.get(key_of(0), range(2, 2))
        assert disk_only.stats()["disk"]["bytes_read"] == 2 * 2 * H * T * D * 2  # just two layers


def test_get_returns_copies(tmp_path: Path) -> None:
    kv = make_kv(3)
    with make_store(tmp_path, disk=0, storage="float32") as s:
        s.put(key_of(0), kv)
        got = s.get(key_of(0))
        assert got is not None
        got.keys.zero_()  # a careless in-place op by the caller must not reach the cache
        kv.values.zero_()  # nor one on the tensors that were put
        again = s.get(key_of(0))
        assert again is not None and bool(again.keys.abs().sum() > 0) and bool(again.values.abs().sum() > 0)


def test_sensitivity_travels_with_the_chunk(tmp_path: Path) -> None:
    kv = make_kv(4)
    kv.sensitivity = torch.rand(T)
    with make_store(tmp_path, storage="float8_e4m3fn") as s:
        s.put(key_of(0), kv)
        for got in from_cpu_then_disk(s, key_of(0)):
            assert torch.equal(got.sensitivity, kv.sensitivity)  # float32, never quantized
            part = s.get(key_of(0), range(2, 4))
            assert part is not None and torch.equal(part.sensitivity, kv.sensitivity)
        s.put(key_of(1), make_kv(5))  # a chunk without one reads back without one
        assert s.get(key_of(1)).sensitivity is None
        with LayerPrefetcher(s, [key_of(0), key_of(1)], L) as pf:
            sens = pf.sensitivity()
            assert torch.equal(sens[0], kv.sensitivity) and sens[1] is None


def test_sensitivity_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    kv = make_kv(4)
    kv.sensitivity = torch.rand(T + 1)
    with make_store(tmp_path) as s, pytest.raises(ValueError, match="sensitivity"):
        s.put(key_of(0), kv)


def test_corrupt_sensitivity_is_dropped(tmp_path: Path) -> None:
    kv = make_kv(4)
    kv.sensitivity = torch.rand(T)
    with make_store(tmp_path, cpu=0) as s:
        s.put(key_of(0), kv)
        s.flush()
        path = blob_path(tmp_path, key_of(0))

        def damage(tensors: dict, meta: dict) -> None:
            tensors["sensitivity"] = tensors["sensitivity"] + 1.0  # checksum no longer matches
        _rewrite(path, damage)
        assert s.get(key_of(0)) is None
        assert not path.exists()


# --- capacity, eviction, promotion, demotion ---------------------------------------------

def test_lru_eviction_order_and_capacity(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=3 * FP16_CHUNK, disk=0) as s:
        for i in range(3):
            s.put(key_of(i), make_kv(i))
        assert s.get(key_of(0)) is not None  # 0 is now the most recently used; 1 the least
        s.put(key_of(3), make_kv(3))
        assert [s.contains(key_of(i)) for i in range(4)] == [True, False, True, True]
        s.put(key_of(4), make_kv(4))
        assert [s.contains(key_of(i)) for i in range(5)] == [True, False, False, True, True]
        cpu = s.stats()["cpu"]
        assert cpu["evictions"] == 2 and cpu["entries"] == 3
        assert cpu["bytes_used"] == 3 * FP16_CHUNK == cpu["capacity"]


def test_chunk_larger_than_tier_is_skipped(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=FP16_CHUNK - 1) as s:
        s.put(key_of(0), make_kv(0))
        got = s.get(key_of(0))
        assert got is not None and got.tier == "disk"
        assert s.stats()["cpu"]["entries"] == 0


def test_write_back_demotes_on_eviction_and_flushes(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=2 * FP16_CHUNK, write="back") as s:
        for i in range(3):
            s.put(key_of(i), make_kv(i))
        disk = s.tiers[1]
        wait_until(lambda: disk.contains(key_of(0)))  # the demotion runs on the background writer
        assert [disk.contains(key_of(i)) for i in range(3)] == [True, False, False]  # only the evicted one
        got = s.get(key_of(0))
        assert got is not None and got.tier == "disk"
        assert_close(got, make_kv(0))
        again = s.get(key_of(0))
        assert again is not None and again.tier == "cpu"  # promoted
        wait_until(lambda: disk.contains(key_of(1)))  # evicted from cpu by the promotion: demoted
        s.flush()
        assert all(disk.contains(key_of(i)) for i in range(3))


def test_write_through_writes_disk_on_put(tmp_path: Path) -> None:
    with make_store(tmp_path) as s:
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert blob_path(tmp_path, key_of(0)).is_file()
        assert s.stats()["disk"]["bytes_written"] == blob_path(tmp_path, key_of(0)).stat().st_size


def test_disk_eviction_by_bytes(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=0, disk=1 << 20) as probe:
        probe.put(key_of(99), make_kv(0))
        probe.flush()
        size = probe.stats()["disk"]["bytes_used"]
        probe.delete(key_of(99))
    with make_store(tmp_path, cpu=0, disk=2 * size) as s:
        for i in range(3):
            s.put(key_of(i), make_kv(i))
        s.flush()
        assert [blob_path(tmp_path, key_of(i)).exists() for i in range(3)] == [False, True, True]
        disk = s.stats()["disk"]
        assert disk["evictions"] == 1 and disk["entries"] == 2 and disk["bytes_used"] == 2 * size


def test_layer_stream_from_disk_promotes_whole_chunk(tmp_path: Path) -> None:
    kv = make_kv(5)
    with make_store(tmp_path) as s:
        s.put(key_of(0), kv)
        s.flush()
        s.tiers[0].remove(key_of(0))
        assert_stream_promotes(s, key_of(0), kv, "disk")


def test_pinned_keys_are_not_evicted(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=2 * FP16_CHUNK, disk=0) as s:
        s.put(key_of(0), make_kv(0))
        s.pin([key_of(0)])
        for i in range(1, 4):
            s.put(key_of(i), make_kv(i))
        assert s.contains(key_of(0)) and s.contains(key_of(3))
        s.unpin([key_of(0)])
        s.put(key_of(4), make_kv(4))
        assert not s.contains(key_of(0))


def test_delete_removes_from_every_tier(tmp_path: Path) -> None:
    with make_store(tmp_path) as s:
        s.put(key_of(0), make_kv(0))
        assert s.delete(key_of(0))
        assert not s.contains(key_of(0)) and s.get(key_of(0)) is None
        assert not blob_path(tmp_path, key_of(0)).exists()
        assert not s.delete(key_of(0))


def test_other_model_fingerprint_is_a_miss(store: TieredStore) -> None:
    store.put(key_of(0, "model-a"), make_kv(0))
    assert store.get(key_of(0, "model-b")) is None
    assert store.stats()["cpu"]["misses"] == 1 and store.stats()["disk"]["misses"] == 1


# --- persistence and crash safety ----------------------------------------------------------

def test_restart_serves_disk_blobs(tmp_path: Path) -> None:
    kv = make_kv(6)
    with make_store(tmp_path) as s:
        s.put(key_of(0), kv)
    with make_store(tmp_path) as s2:
        assert s2.stats()["disk"]["entries"] == 1
        got = s2.get(key_of(0))
        assert got is not None and got.tier == "disk"
        assert_close(got, kv)


def test_restart_rebuilds_lru_order_from_mtime(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=0) as s:
        for i in range(3):
            s.put(key_of(i), make_kv(i))
        s.flush()
        size = s.stats()["disk"]["bytes_used"] // 3
    for i, mtime in enumerate([3000, 1000, 2000]):  # key 1 is the oldest
        os.utime(blob_path(tmp_path, key_of(i)), (mtime, mtime))
    with make_store(tmp_path, cpu=0, disk=2 * size) as s2:  # room for two: drops the oldest
        assert [s2.contains(key_of(i)) for i in range(3)] == [True, False, True]
        assert s2.get(key_of(2)) is not None  # a read refreshes the mtime, so 2 outlives 0 next time
    with make_store(tmp_path, cpu=0, disk=size) as s3:
        assert [s3.contains(key_of(i)) for i in range(3)] == [False, False, True]


def test_temp_files_of_interrupted_writes_are_ignored_and_removed(tmp_path: Path) -> None:
    key = key_of(0)
    shard = tmp_path / "kv" / key[:2]
    shard.mkdir(parents=True)
    tmp = shard / f"{TEMP_PREFIX}{key}.safetensors.0123abcd"
    tmp.write_bytes(b"half a blob")
    (tmp_path / "kv" / "not-a-key.safetensors").write_bytes(b"x")
    with make_store(tmp_path) as s:
        assert not tmp.exists()
        assert not s.contains(key) and s.get(key) is None
        assert s.stats()["disk"]["entries"] == 0


def _rewrite(path: Path, edit) -> None:
    """Re-save a blob after `edit(tensors, metadata)` changed it."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors, meta)
    save_file(tensors, path, metadata=meta)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _wrong_shape_in_header(path: Path) -> None:
    def edit(tensors: dict, meta: dict) -> None:
        meta["shape"] = json.dumps([L, H, T + 1, D])
        meta["num_tokens"] = str(T + 1)
    _rewrite(path, edit)


def _tensor_shape_disagrees(path: Path) -> None:
    def edit(tensors: dict, meta: dict) -> None:
        tensors["k.0"] = tensors["k.0"][:, :-1].clone()
    _rewrite(path, edit)


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00" * 8
    path.write_bytes(bytes(data))


def _renamed_from_other_key(path: Path) -> None:
    other = make_store(path.parents[2], cpu=0, disk_dir="other")
    other.put(key_of(1), make_kv(1))
    other.close()
    blob_path(path.parents[2], key_of(1), "other").replace(path)


@pytest.mark.parametrize("damage", [_flip_last_byte, _truncate, _wrong_shape_in_header, _tensor_shape_disagrees,
                                    _garbage_header, _renamed_from_other_key])
def test_corrupt_blob_is_dropped_and_counted(tmp_path: Path, damage) -> None:
    with make_store(tmp_path, cpu=0) as s:
        s.put(key_of(0), make_kv(0))
    path = blob_path(tmp_path, key_of(0))
    damage(path)
    with make_store(tmp_path, cpu=0) as s2:
        assert s2.get(key_of(0)) is None
        disk = s2.stats()["disk"]
        assert disk["corrupt"] == 1 and disk["hits"] == 0 and disk["entries"] == 0
        assert not path.exists()
        # The engine recomputes; the fresh blob is served again.
        got = s2.get_or_compute(key_of(0), lambda: make_kv(0))
        assert got.tier == "computed" and s2.get(key_of(0)) is not None


# --- concurrency ---------------------------------------------------------------------------

def test_concurrent_puts_and_gets_of_one_key(tmp_path: Path) -> None:
    kv = make_kv(7)
    errors: list[BaseException] = []
    with make_store(tmp_path, cpu=3 * FP16_CHUNK) as s:
        def worker(n: int) -> None:
            try:
                for i in range(15):
                    if (n + i) % 3 == 0:
                        s.put(key_of(0), kv)
                    elif (n + i) % 3 == 1:
                        s.put(key_of(100 + n), make_kv(n))  # churn: forces evictions
                    got = s.get(key_of(0), None if i % 2 else range(i % L, L))
                    if got is not None:
                        assert_close(got, ChunkKV(kv.keys[got.first_layer:], kv.values[got.first_layer:]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        s.flush()
        assert_close(s.get(key_of(0)), kv)  # type: ignore[arg-type]
        assert s.stats()["cpu"]["bytes_used"] <= 3 * FP16_CHUNK


def test_get_or_compute_is_single_flight(store: TieredStore) -> None:
    calls = []
    barrier = threading.Barrier(8)
    results: list[ChunkKV] = []

    def compute() -> ChunkKV:
        calls.append(1)
        time.sleep(0.3)
        return make_kv(8)

    def worker() -> None:
        barrier.wait()
        results.append(store.get_or_compute(key_of(0), compute))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    for r in results:
        assert r.tier == "computed"
        assert torch.equal(r.keys, make_kv(8).keys)
    cached = store.get_or_compute(key_of(0), compute)
    assert cached.tier == "cpu" and len(calls) == 1


def test_get_or_compute_failure_reaches_every_waiter(store: TieredStore) -> None:
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def compute() -> ChunkKV:
        time.sleep(0.2)
        raise RuntimeError("model exploded")

    def worker() -> None:
        barrier.wait()
        try:
            store.get_or_compute(key_of(0), compute)
        except RuntimeError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["model exploded"] * 4
    assert store.get_or_compute(key_of(0), lambda: make_kv(0)).tier == "computed"  # not stuck


# --- Redis -------------------------------------------------------------------------------

def redis_tier(url: str, **kw) -> RedisTier:
    return RedisTier(url, kw.pop("ttl_s", 3600), kw.pop("max_bytes", 1 << 20), kw.pop("timeout_s", 0.3), **kw)


@needs_redis
def test_two_stores_share_chunks_through_redis(tmp_path: Path, redis_url: str) -> None:
    kv = make_kv(9)
    kv.sensitivity = torch.rand(T)
    with make_store(tmp_path, disk_dir="a", extra=[redis_tier(redis_url)]) as a, \
         make_store(tmp_path, disk_dir="b", extra=[redis_tier(redis_url)]) as b:
        a.put(key_of(0), kv)
        a.flush()
        got = b.get(key_of(0))
        assert got is not None and got.tier == "redis"
        assert_close(got, kv)
        assert torch.equal(got.sensitivity, kv.sensitivity)
        again = b.get(key_of(0))
        assert again is not None and again.tier == "cpu"
        b.flush()
        assert blob_path(tmp_path, key_of(0), "b").is_file()  # promoted to b's disk too
        # get_or_compute on the other node reuses it instead of computing.
        c = make_store(tmp_path, disk_dir="c", extra=[redis_tier(redis_url)])
        assert c.get_or_compute(key_of(0), lambda: pytest.fail("recomputed a shared chunk")).tier == "redis"
        c.close()


@needs_redis
def test_disk_eviction_demotes_to_redis(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with make_store(tmp_path, cpu=0, disk=FP16_CHUNK + 2000, extra=[redis_tier(redis_url)]) as s:
        s.put(key_of(0), make_kv(0))
        s.flush()
        client.delete(KEY_PREFIX + key_of(0))  # as if its TTL ran out
        s.put(key_of(1), make_kv(1))  # the disk holds one chunk: key 0 moves down to Redis
        s.flush()
        assert not blob_path(tmp_path, key_of(0)).exists()
        assert client.exists(KEY_PREFIX + key_of(0))
        got = s.get(key_of(0))
        assert got is not None and got.tier == "redis"
        assert_close(got, make_kv(0))


@needs_redis
def test_redis_ttl_and_size_limit(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with make_store(tmp_path, extra=[redis_tier(redis_url, ttl_s=120)]) as s:
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert 0 < client.ttl(KEY_PREFIX + key_of(0)) <= 120
    with make_store(tmp_path, disk_dir="small", extra=[redis_tier(redis_url, max_bytes=1000)]) as s:
        s.put(key_of(1), make_kv(1))
        s.flush()
        assert not client.exists(KEY_PREFIX + key_of(1))
        assert s.stats()["redis"]["bytes_written"] == 0


@needs_redis
def test_corrupt_redis_blob_is_dropped(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with make_store(tmp_path, disk_dir="a", extra=[redis_tier(redis_url)]) as a:
        a.put(key_of(0), make_kv(0))
        a.flush()
    data = bytearray(client.get(KEY_PREFIX + key_of(0)))
    data[-1] ^= 0xFF
    client.set(KEY_PREFIX + key_of(0), bytes(data))
    with make_store(tmp_path, disk_dir="b", extra=[redis_tier(redis_url)]) as b:
        assert b.get(key_of(0)) is None
        assert b.stats()["redis"]["corrupt"] == 1
        assert not client.exists(KEY_PREFIX + key_of(0))


@needs_redis
def test_redis_failure_degrades_to_local_tiers(tmp_path: Path) -> None:
    with start_redis() as server:
        tier = redis_tier(server.url, retry_after_s=1.0)
        with make_store(tmp_path, extra=[tier]) as s:
            s.put(key_of(0), make_kv(0))
            s.flush()
            server.kill()
            s.put(key_of(1), make_kv(1))  # still stored locally
            s.flush()
            for i in range(2):
                got = s.get(key_of(i))
                assert got is not None and got.tier == "cpu"
            t0 = time.monotonic()
            for i in range(2, 6):  # misses everywhere; Redis is skipped, not waited on
                assert s.get(key_of(i)) is None
                assert s.get_or_compute(key_of(i), lambda: make_kv(0)).tier == "computed"
            s.flush()
            assert time.monotonic() - t0 < 2
            errors = s.stats()["redis"]["errors"]
            assert errors >= 1
            assert errors <= 2  # one failure opens the breaker; no attempt per call

            server.start()
            time.sleep(1.1)  # past retry_after_s: Redis is tried again
            s.put(key_of(7), make_kv(7))
            s.flush()
            assert redis.Redis.from_url(server.url).exists(KEY_PREFIX + key_of(7))


@needs_redis
def test_redis_timeout_degrades(tmp_path: Path) -> None:
    with start_redis() as server:
        with make_store(tmp_path, cpu=0, disk=0, extra=[redis_tier(server.url, timeout_s=0.2)]) as s:
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)  # hangs: connections open, no answers
            try:
                t0 = time.monotonic()
                assert s.get(key_of(0)) is None
                assert time.monotonic() - t0 < 1.5
                assert s.stats()["redis"]["errors"] == 1
            finally:
                server.proc.send_signal(signal.SIGCONT)


# --- S3 ----------------------------------------------------------------------------------

def test_s3_round_trip(tmp_path: Path, aws_env: MotoServer) -> None:
    kv = make_kv(10)
    kv.sensitivity = torch.rand(T)
    with make_store(tmp_path, cpu=0, disk=0, extra=[S3Tier("kvstore-test", "test/", aws_env.endpoint)]) as s:
        s.put(key_of(0), kv)
        s.flush()
        objects = aws_env.client().list_objects_v2(Bucket="kvstore-test", Prefix="test/")["Contents"]
        assert [o["Key"] for o in objects] == [f"test/{key_of(0)}.safetensors"]
    with make_store(tmp_path, disk_dir="b", extra=[S3Tier("kvstore-test", "test/", aws_env.endpoint)]) as s2:
        assert s2.contains(key_of(0))
        got = s2.get(key_of(0))
        assert got is not None and got.tier == "s3"
        assert_close(got, kv)
        assert torch.equal(got.sensitivity, kv.sensitivity)
        assert s2.get(key_of(1)) is None
        assert s2.stats()["s3"]["misses"] == 1 and s2.stats()["s3"]["errors"] == 0
        assert s2.delete(key_of(0))
        assert "Contents" not in aws_env.client().list_objects_v2(Bucket="kvstore-test", Prefix="test/")


def test_s3_unreachable_degrades(tmp_path: Path, aws_env: MotoServer) -> None:
    from server.launcher import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    with make_store(tmp_path, extra=[S3Tier("kvstore-test", "", dead, timeout_s=0.5)]) as s:
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert s.get(key_of(0)) is not None and s.get(key_of(1)) is None
        assert s.stats()["s3"]["errors"] >= 1


# --- one tier interface: new tiers, background writes, failures --------------------------

class DictTier(Tier):
    """A tier written here, not in kvstore/: a shared "remote" dict of serialized chunks."""

    shared = True

    def __init__(self, blobs: dict[str, bytes], fail: bool = False) -> None:
        super().__init__("dict", 0)
        self.blobs = blobs
        self.fail = fail

    def _read(self, key: str, layers: Optional[range]):
        data = self.blobs.get(key)
        return None if data is None else serialize.from_bytes(key, data, layers)

    def contains(self, key: str) -> bool:
        return key in self.blobs

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        if self.fail:
            raise ConnectionError("remote down")
        self.blobs[key] = payload.data
        self.counters.add(bytes_written=len(payload.data))

    def remove(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None


class GatedDisk(DiskTier):
    """A disk tier whose writes wait until `gate` is set."""

    def __init__(self, root: Path, capacity: int) -> None:
        super().__init__(root, capacity)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write(self, key: str, payload: Payload, pinned: Pinned, on_evict: Optional[OnEvict]) -> None:
        self.writing.set()
        assert self.gate.wait(10)
        super().write(key, payload, pinned, on_evict)


def test_a_new_tier_class_plugs_in(tmp_path: Path) -> None:
    shared: dict[str, bytes] = {}
    kv = make_kv(11)
    with make_store(tmp_path, disk_dir="a", extra=[DictTier(shared)]) as a:
        a.put(key_of(0), kv)
        a.flush()
        assert key_of(0) in shared and a.stats()["dict"]["bytes_written"] == len(shared[key_of(0)])
    with make_store(tmp_path, disk_dir="b", extra=[DictTier(shared)]) as b:
        assert_stream_promotes(b, key_of(0), kv, "dict")
        assert blob_path(tmp_path, key_of(0), "b").is_file()  # promoted into the disk too
        assert b.delete(key_of(0)) and not shared


def test_two_disk_tiers_promote_and_demote_across(tmp_path: Path) -> None:
    ssd = DiskTier(tmp_path / "ssd", FP16_CHUNK + 2000, name="ssd")  # one chunk file
    nfs = DiskTier(tmp_path / "nfs", 1 << 20, name="nfs")
    with TieredStore([MemoryTier("cpu", FP16_CHUNK, torch.device("cpu")), ssd, nfs]) as s:
        s.put(key_of(0), make_kv(0))
        s.put(key_of(1), make_kv(1))  # cpu and ssd hold one chunk: key 0 moves down to nfs
        s.flush()
        assert [ssd.contains(key_of(i)) for i in range(2)] == [False, True]
        assert [nfs.contains(key_of(i)) for i in range(2)] == [True, False]  # only by demotion
        got = s.get(key_of(0))
        assert got is not None and got.tier == "nfs"
        assert_close(got, make_kv(0))
        s.flush()
        again = s.get(key_of(0))
        assert again is not None and again.tier == "cpu"  # promoted into cpu and ssd
        assert ssd.contains(key_of(0)) and nfs.contains(key_of(1))  # key 1 moved down in turn
        assert list(s.stats()) == ["cpu", "ssd", "nfs"]
        assert s.stats()["ssd"]["evictions"] == 2 and s.stats()["nfs"]["hits"] == 1


@pytest.mark.parametrize("cpu", [1 << 20, 0])
def test_put_returns_before_the_disk_write_lands(tmp_path: Path, cpu: int) -> None:
    disk = GatedDisk(tmp_path / "kv", 1 << 20)
    tiers: list[Tier] = [MemoryTier("cpu", cpu, torch.device("cpu"))] if cpu else []
    with TieredStore(tiers + [disk]) as s:
        s.put(key_of(0), make_kv(0))  # returns while the disk write waits on the gate
        assert disk.writing.wait(10)
        assert not disk.contains(key_of(0)) and not blob_path(tmp_path, key_of(0)).exists()
        assert s.contains(key_of(0))
        got = s.get(key_of(0))
        assert got is not None and got.tier == ("cpu" if cpu else "disk")
        assert_close(got, make_kv(0))
        part = s.get(key_of(0), range(1, 3))
        assert part is not None and part.first_layer == 1
        disk.gate.set()
        s.flush()
        assert disk.contains(key_of(0)) and blob_path(tmp_path, key_of(0)).is_file()


def test_delete_cancels_pending_writes(tmp_path: Path) -> None:
    disk = GatedDisk(tmp_path / "kv", 1 << 20)
    with TieredStore([MemoryTier("cpu", 1 << 20, torch.device("cpu")), disk]) as s:
        s.put(key_of(0), make_kv(0))
        s.put(key_of(1), make_kv(1))
        assert disk.writing.wait(10)  # writing key 0; key 1 queued behind it
        assert s.delete(key_of(1))  # queued: cancelled at once
        deleting = threading.Thread(target=s.delete, args=(key_of(0),))
        deleting.start()
        time.sleep(0.2)
        assert deleting.is_alive()  # under way: delete waits until the write has undone itself
        disk.gate.set()
        deleting.join(10)
        s.flush()
        assert not s.contains(key_of(0)) and not s.contains(key_of(1))
        assert not blob_path(tmp_path, key_of(0)).exists() and not blob_path(tmp_path, key_of(1)).exists()


def test_failed_background_write_is_counted_not_raised(tmp_path: Path) -> None:
    with make_store(tmp_path, extra=[DictTier({}, fail=True)]) as s:
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert s.stats()["dict"]["errors"] == 1
        got = s.get(key_of(0))
        assert got is not None and got.tier == "cpu"


def test_failed_disk_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(5, "I/O error")

    with make_store(tmp_path, cpu=0) as s:
        monkeypatch.setattr(os, "fsync", fail)  # the blob is written, then its fsync fails
        s.put(key_of(0), make_kv(0))
        s.flush()
        monkeypatch.undo()
        assert s.stats()["disk"]["errors"] == 1 and s.stats()["disk"]["entries"] == 0
        assert not [p for p in (tmp_path / "kv").rglob("*") if p.is_file()]  # not even a temp file
        assert s.get(key_of(0)) is None  # it was only on its way: lost, never served half
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert s.get(key_of(0)) is not None


# --- shared helpers ---------------------------------------------------------------------------

def test_lru_evicts_least_recent_unpinned_to_fit() -> None:
    lru: LRU[str] = LRU(10)
    for key, size in (("a", 4), ("b", 3), ("c", 3)):
        lru.add(key, size)
    assert lru.used == 10 and lru.evict() == []
    lru.touch("a")  # order now b, c, a
    lru.add("d", 4)  # 4 bytes over
    assert lru.evict(keep="d", pinned=lambda k: k == "b") == ["c", "a"]
    assert lru.used == 7 and "b" in lru and len(lru) == 2
    lru.add("b", 9)  # a rewrite replaces its size and makes it the most recent
    assert lru.used == 13 and lru.evict(keep="b") == ["d"] and lru.used == 9
    over: LRU[int] = LRU(5)
    over.add(1, 6)
    assert over.evict(keep=1) == [] and over.used == 6  # what may not go stays, over capacity
    assert lru.remove("b") and not lru.remove("b") and lru.used == 0


def test_copy_targets_follow_tier_traits() -> None:
    def tier(volatile: bool = False, shared: bool = False) -> SimpleNamespace:
        return SimpleNamespace(volatile=volatile, shared=shared)

    device, cpu, disk, disk2, redis_ = tier(True), tier(True), tier(), tier(), tier(shared=True)
    tiers = [device, cpu, disk, disk2, redis_]
    assert copy_targets(tiers, 5, True, put=True) == [0, 2, 4]  # top, the first disk, shared
    assert copy_targets(tiers, 5, False, put=True) == [0, 4]
    assert copy_targets(tiers, 4, True, put=False) == [0, 1, 2]  # found in redis
    assert copy_targets(tiers, 4, False, put=False) == [0, 1]
    assert copy_targets(tiers, 2, True, put=False) == [0, 1]  # found on the first disk
    assert copy_targets(tiers, 0, True, put=False) == []
    assert copy_targets([disk, disk2], 2, False, put=True) == [0]  # the top tier in any mode
    assert write_back_targets(tiers) == [2]
    assert write_back_targets([disk, redis_]) == [] and write_back_targets([cpu, redis_]) == []


def test_disk_tier_and_registry_share_the_file_layout(tmp_path: Path) -> None:
    k = key_of(0)
    assert shard_path(tmp_path, k, ".x") == tmp_path / k[:2] / f"{k}.x"
    with pytest.raises(ValueError):
        shard_path(tmp_path, "../" + k[3:], ".x")
    for path in (shard_path(tmp_path, k, ".x"), tmp_path / "zz" / f"{k}.x", tmp_path / k[:2] / "other.x"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert list(shard_files(tmp_path, ".x")) == [(k, shard_path(tmp_path, k, ".x"))]
    assert DiskTier(tmp_path / "kv", 1 << 20).path(k) == shard_path(tmp_path / "kv", k, ".safetensors")
    ChunkRegistry(tmp_path / "chunks").add(k, "text", [1])
    assert shard_path(tmp_path / "chunks", k, ".json").is_file()


# --- factory -------------------------------------------------------------------------------

def test_build_store_from_settings(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(data_dir=tmp_path, kv_cpu_bytes=1 << 20, kv_disk_bytes=1 << 20,
                        kv_storage_dtype="bfloat16", redis_url=redis_url)
    with build_store(settings, torch.device("cpu")) as s:
        assert [t.name for t in s.tiers] == ["cpu", "disk", "redis"]
        s.put(key_of(0), make_kv(0))
        s.flush()
        assert (tmp_path / "kv" / key_of(0)[:2] / f"{key_of(0)}.safetensors").is_file()
        assert set(s.stats()["disk"]) == {"hits", "misses", "bytes_read", "bytes_written", "evictions", "corrupt",
                                          "errors", "load_seconds", "bytes_used", "capacity", "entries"}
    off = Settings(data_dir=tmp_path, kv_disk_bytes=0)
    with build_store(off, torch.device("cpu")) as s:
        assert [t.name for t in s.tiers] == ["cpu"]


# --- registry ------------------------------------------------------------------------------

def test_registry_persistence_and_paging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = ChunkRegistry(tmp_path / "chunks")
    keys = [key_of(i) for i in range(5)]
    clock = iter([100, 100, 100, 50, 200])  # ties broken by key; creation order is not key order
    monkeypatch.setattr(time, "time", lambda: next(clock))
    for i, k in enumerate(keys):
        rec = reg.add(k, f"text {i}", list(range(i, i + 3)))
        assert rec == {"key": k, "text": f"text {i}", "token_ids": list(range(i, i + 3)), "created": rec["created"],
                       "tenant": "default", "shared": False}
    monkeypatch.undo()
    assert reg.add(keys[0], "other text", [9])["text"] == "text 0"  # first registration wins
    expected = [keys[3]] + sorted(keys[:3]) + [keys[4]]

    reg2 = ChunkRegistry(tmp_path / "chunks")  # a restart
    assert len(reg2) == 5 and keys[2] in reg2 and "nonsense" not in reg2
    assert reg2.get(keys[1])["token_ids"] == [1, 2, 3]  # type: ignore[index]
    pages, after = [], None
    while page := reg2.list(after=after, limit=2):
        pages.append([r["key"] for r in page])
        after = page[-1]["key"]
    assert [k for p in pages for k in p] == expected and [len(p) for p in pages] == [2, 2, 1]
    with pytest.raises(ValueError):
        reg2.list(after=key_of(99))
    with pytest.raises(ValueError):
        reg2.get("../secrets")
    assert reg2.delete(keys[0]) and not reg2.delete(keys[0])
    assert reg2.get(keys[0]) is None and keys[0] not in [r["key"] for r in reg2.list(limit=10)]
    assert ChunkRegistry(tmp_path / "chunks").get(keys[0]) is None


@needs_redis
def test_registry_shared_through_redis(tmp_path: Path, redis_url: str) -> None:
    a = ChunkRegistry(tmp_path / "a", redis_url)
    b = ChunkRegistry(tmp_path / "b", redis_url)
    k = key_of(0)
    a.add(k, "hello", [1, 2])
    rec = b.get(k)
    assert rec is not None and rec["text"] == "hello" and k in b
    a.add(key_of(1), "world", [3])
    assert [r["key"] for r in b.list(limit=10)] == [r["key"] for r in a.list(limit=10)]
    assert len(b.list(limit=10)) == 2
    assert a.delete(k)
    assert [r["key"] for r in b.list(limit=10)] == [key_of(1)]
    a.close()
    b.close()


@needs_redis
def test_registry_survives_redis_failure(tmp_path: Path) -> None:
    with start_redis() as server:
        reg = ChunkRegistry(tmp_path / "chunks", server.url)
        reg.add(key_of(0), "before", [1])
        server.kill()
        reg.add(key_of(1), "during", [2])
        assert reg.get(key_of(0))["text"] == "before"  # type: ignore[index]
        assert sorted(r["text"] for r in reg.list(limit=5)) == ["before", "during"]
        assert reg.errors >= 1
        reg.close()


@needs_redis
def test_registry_publishes_local_records_to_a_fresh_or_restarted_redis(tmp_path: Path) -> None:
    local = ChunkRegistry(tmp_path / "chunks")  # registered before Redis was configured
    local.add(key_of(0), "local", [1])
    with start_redis() as server:
        reg = ChunkRegistry(tmp_path / "chunks", server.url, retry_after_s=0.0)
        other = ChunkRegistry(tmp_path / "other", server.url)
        assert [r["text"] for r in other.list(limit=5)] == []  # nothing has reached Redis yet
        assert [r["text"] for r in reg.list(limit=5)] == ["local"]  # listing publishes first
        assert [r["text"] for r in other.list(limit=5)] == ["local"]
        server.kill()
        reg.add(key_of(1), "while down", [2])
        server.restart()  # back, and empty
        reg.add(key_of(2), "after", [3])
        assert sorted(r["text"] for r in other.list(limit=5)) == ["after", "local", "while down"]
        reg.close()
        other.close()


@needs_redis
def test_a_chunk_made_shared_while_redis_is_down_is_shared_there_once_it_is_back(tmp_path: Path) -> None:
    from kvstore.registry import INDEX_KEY, RECORD_PREFIX

    with start_redis() as server:
        reg = ChunkRegistry(tmp_path / "chunks", server.url, retry_after_s=0.0)
        old = reg.add(key_of(0), "public corpus", [1])
        server.kill()
        assert reg.add(key_of(0), "public corpus", [1], shared=True)["shared"] is True  # Redis missed it
        server.restart()
        raw = redis.Redis.from_url(server.url)  # a Redis that kept its data: it still has the old record
        raw.set(RECORD_PREFIX + key_of(0), json.dumps(old))
        raw.zadd(INDEX_KEY, {key_of(0): old["created"]})
        reg.list(limit=5)  # the next sync replaces it (a first publish would not: SET NX)
        other = ChunkRegistry(tmp_path / "other", server.url)
        assert other.get(key_of(0))["shared"] is True  # type: ignore[index]
        raw.close()
        reg.close()
        other.close()


# --- layer prefetcher -------------------------------------------------------------------------

@pytest.mark.parametrize("layers_per_fetch", [1, 3])
def test_layer_prefetcher_matches_direct_get(tmp_path: Path, layers_per_fetch: int) -> None:
    with make_store(tmp_path, cpu=2 * FP16_CHUNK) as s:
        keys = [key_of(i) for i in range(3)]
        for i, k in enumerate(keys):
            s.put(k, make_kv(i))  # key 0 is evicted to disk: a mix of tiers
        direct = [s.get(k) for k in keys]
        with LayerPrefetcher(s, keys, L, layers_per_fetch) as pf:
            for l in range(L):
                layer = pf.layer(l)
                assert len(layer) == 3
                for (k, v), full in zip(layer, direct):
                    assert full is not None
                    assert torch.equal(k, full.keys[l]) and torch.equal(v, full.values[l])
            assert all(t >= 0 for t in pf.load_seconds) and len(pf.wait_seconds) == L
            assert set(pf.tiers) == set(keys) and set(pf.tiers.values()) <= {"cpu", "disk"}


class _ShortReads:
    """A store whose reads come back without layers (the loader thread's own code then fails)."""

    def __init__(self, store, delay_s: float = 0.0) -> None:
        self.store, self.delay_s = store, delay_s

    def get(self, key, layers=None):
        time.sleep(self.delay_s)
        kv = self.store.get(key, layers)
        return ChunkKV(kv.keys[:0], kv.values[:0], kv.first_layer, kv.tier)


class _CountedReads:
    """A store that records the first layer of every read."""

    def __init__(self, store) -> None:
        self.store, self.first_layers = store, []

    def get(self, key, layers=None):
        self.first_layers.append(layers.start)
        return self.store.get(key, layers)


def test_layer_prefetcher_reads_only_a_few_layers_ahead_of_the_consumer(tmp_path: Path) -> None:
    """A paused prefill must not have all its chunk KV decoded at once beside the engine's work."""
    from kvstore.prefetch import LOOKAHEAD

    assert L > LOOKAHEAD + 1
    with make_store(tmp_path) as s:
        s.put(key_of(0), make_kv(0))
        reads = _CountedReads(s)
        with LayerPrefetcher(reads, [key_of(0)], L) as pf:
            pf.layer(0)
            time.sleep(0.3)  # time enough to read every layer, were it not bounded
            assert max(reads.first_layers) <= LOOKAHEAD
            pf.layer(L - 1)  # asking further lets it go on
            assert reads.first_layers == list(range(L))


class _ThreadCountReads:
    """A store that records torch's thread count on the thread that reads (the loader's)."""

    def __init__(self, store) -> None:
        self.store, self.counts = store, []

    def get(self, key, layers=None):
        self.counts.append(torch.get_num_threads())
        return self.store.get(key, layers)


def test_layer_prefetcher_runs_single_threaded_without_changing_other_threads(tmp_path: Path) -> None:
    """The loader runs its torch ops on one thread, and every other thread keeps torch's
    count: `torch.set_num_threads(1)` there once made the engine's thread (and any thread that
    starts later) adopt 1, halving prefill and decode speed on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with make_store(tmp_path) as s:
            s.put(key_of(0), make_kv(0))
            reads = _ThreadCountReads(s)
            with LayerPrefetcher(reads, [key_of(0)], L) as pf:
                pf.layer(L - 1)
        assert reads.counts and set(reads.counts) == {1}
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 2 and later == [2]
    finally:
        torch.set_num_threads(before)


def test_layer_prefetcher_reports_a_dead_loader_instead_of_hanging(tmp_path: Path) -> None:
    with make_store(tmp_path) as s:
        s.put(key_of(0), make_kv(0))
        with LayerPrefetcher(_ShortReads(s), [key_of(0)], L) as pf:
            with pytest.raises(ChunkMissing) as err:
                pf.layer(0)
            assert err.value.key == key_of(0)


def test_layer_prefetcher_gives_up_on_a_stuck_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvstore import prefetch

    monkeypatch.setattr(prefetch, "LAYER_WAIT_S", 0.2)
    with make_store(tmp_path) as s:
        s.put(key_of(0), make_kv(0))
        t0 = time.perf_counter()
        with LayerPrefetcher(_ShortReads(s, delay_s=2.0), [key_of(0)], L) as pf:
            with pytest.raises(ChunkMissing):
                pf.layer(0)
        assert time.perf_counter() - t0 < 1.5  # neither the wait nor close() sat out the 2 s read


def test_layer_prefetcher_missing_chunk(tmp_path: Path) -> None:
    with make_store(tmp_path, cpu=0) as s:
        s.put(key_of(0), make_kv(0))
        s.put(key_of(1), make_kv(1))
        s.flush()

        def edit(tensors: dict, meta: dict) -> None:
            tensors["v.2"] = tensors["v.2"] + 1  # checksum in the header no longer matches
        _rewrite(blob_path(tmp_path, key_of(1)), edit)

        with LayerPrefetcher(s, [key_of(0), key_of(1)], L) as pf:
            assert len(pf.layer(0)) == 2 and len(pf.layer(1)) == 2
            with pytest.raises(ChunkMissing) as err:
                pf.layer(2)
            assert err.value.key == key_of(1)
            with pytest.raises(ChunkMissing):
                pf.layer(3)
        assert s.stats()["disk"]["corrupt"] == 1

        with LayerPrefetcher(s, [key_of(0), key_of(5)], L) as pf:
            with pytest.raises(ChunkMissing):
                pf.layer(0)
