"""The fault suite at its CI size (`cacheblend bench faults --size ci`), end to end: real server
processes, a real redis-server and moto S3 server, a real tmpfs. Every fault must cost nothing it
should not (no failed and no lost request), pass its own checks, and every bad input must get its
expected status in the OpenAI error shape."""

from __future__ import annotations

import pytest

from bench.faults import run_suite
from bench.services import redis_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not redis_available(), reason="redis-server is not installed (make test installs it)")]


@pytest.fixture(scope="module")
def report() -> dict:
    return run_suite("ci")


def _fault(report: dict, name: str) -> dict:
    return next(f for f in report["faults"] if f["name"] == name)


@pytest.mark.parametrize("name", ["concurrency", "redis", "s3", "disk_full", "sigkill", "disconnects", "bad_input"])
def test_fault_costs_nothing(report, name):
    fault = _fault(report, name)
    if fault["skipped"]:
        pytest.skip(fault["skipped"])
    assert fault["sent"] > 0
    assert (fault["failed"], fault["lost"]) == (0, 0), fault["notes"]
    assert all(fault["checks"].values()), fault["notes"]
    assert fault["faults_injected"] > 0 and fault["faults_survived"] == fault["faults_injected"], fault["notes"]


def test_concurrent_streams_all_complete(report):
    fault = _fault(report, "concurrency")
    assert fault["completed"] == fault["sent"]
    assert fault["checks"]["answers_equal_one_by_one"] and fault["checks"]["every_stream_done"]


def test_every_bad_input_gets_its_status_in_the_error_shape(report):
    cases = _fault(report, "bad_input")["details"]
    assert len({c["name"] for c in cases}) >= 40
    wrong = [c for c in cases if c["status"] != c["expect"] or not c["error_shape"]]
    assert not wrong, wrong
    assert _fault(report, "bad_input")["checks"]["healthy_after"]


def test_disconnects_free_their_slots_and_memory(report):
    fault = _fault(report, "disconnects")
    assert fault["checks"]["idle_after"] and fault["checks"]["running_gauge_zero"]
    assert fault["bytes_leaked"] is not None and fault["checks"]["memory_returned"]
