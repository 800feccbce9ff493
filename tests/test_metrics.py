"""server/metrics.py: exposed names, label sets, buckets, store-counter deltas; and the test
Prometheus harness (tests/prometheus_service.py) scraping a Metrics endpoint and answering
every dashboard query. The end-to-end test against the real server is test_dashboards_e2e.py."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import re
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import server.metrics as metrics_module
from engine.stats import RequestStats
from server.metrics import Metrics
from prometheus_service import dashboard_queries, query, start_prometheus, wait_for_scrapes

DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "dashboards" / "cacheblend.json"

VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]

REQUEST = RequestStats(
    mode="cacheblend", status="ok", finish_reason="stop",
    prompt_tokens=120, completion_tokens=4, tokens_reused=90, tokens_recomputed=30,
    chunk_hits={"cpu": 2, "disk": 1}, chunk_misses=1,
    queue_s=0.002, kv_fetch_s=0.004, selection_s=0.001, recompute_s=0.02,
    first_decode_s=0.01, ttft_s=0.037, e2e_s=0.09, itl_s=[0.015, 0.017, 0.02],
)
STORE = {
    "cpu": {"hits": 5, "misses": 2, "bytes_read": 4096, "bytes_written": 8192, "evictions": 1,
            "corrupt": 0, "errors": 0, "load_seconds": 0.01, "bytes_used": 8192, "capacity": 1 << 20, "entries": 2},
    "disk": {"hits": 1, "misses": 1, "bytes_read": 2048, "bytes_written": 8192, "evictions": 0,
             "corrupt": 1, "errors": 0, "load_seconds": 0.02, "bytes_used": 8192, "capacity": 1 << 30, "entries": 2},
}


def populated(model_name: str = "smol") -> Metrics:
    """A Metrics with every metric observed at least once."""
    m = Metrics(model_name)
    m.observe_request(REQUEST)
    m.observe_request(dataclasses.replace(REQUEST, mode="full_prefill", tokens_reused=0, tokens_recomputed=120,
                                          chunk_hits={}, chunk_misses=0, finish_reason="length"))
    m.observe_store(STORE)
    m.observe_quality(0.02, True, 0.8)
    m.set_queue(running=1, waiting=2)
    m.set_ratio(0.15)
    m.controller_decision("hold")
    m.observe_tenant("team-a", "ok")
    return m


def families(m: Metrics) -> dict:
    body, _ = m.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"model_name": m.model_name, **labels})


def documented() -> dict[str, tuple[str, set[str]]]:
    """{name: (type, label names)} from the module docstring's table."""
    table, kind = {}, None
    for line in metrics_module.__doc__.splitlines():
        header = line.strip().rstrip("s").lower()
        if header in ("histogram", "counter", "gauge"):
            kind = header
        m = re.match(r"\s+(cacheblend:\w+)\{([\w,]+)\}", line)
        if m and kind:
            table[m.group(1)] = (kind, set(m.group(2).split(",")))
    return table


def test_exposed_names_types_and_labels_are_as_documented():
    doc = documented()
    exposed = {}
    for name, family in families(populated()).items():
        sample_name = name + "_total" if family.type == "counter" else name
        labels = set().union(*(s.labels.keys() for s in family.samples)) - {"le"}
        exposed[sample_name] = (family.type, labels)
    assert exposed == doc
    assert all(labels >= {"model_name"} for _, labels in doc.values())


def test_ttft_and_phase_histograms_use_vllm_buckets():
    m = populated()
    for name in ("cacheblend:time_to_first_token_seconds", "cacheblend:ttft_phase_seconds"):
        bounds = sorted({float(s.labels["le"]) for s in families(m)[name].samples if s.name.endswith("_bucket")})
        assert bounds == VLLM_TTFT_BUCKETS + [float("inf")]


def test_observe_request_counts_tokens_phases_and_gaps():
    m = populated()
    assert value(m, "cacheblend:requests_total", status="ok") == 2
    assert value(m, "cacheblend:requests_total", status="rejected") == 0
    assert value(m, "cacheblend:request_success_total", finished_reason="stop") == 1
    assert value(m, "cacheblend:request_success_total", finished_reason="length") == 1
    assert value(m, "cacheblend:prompt_tokens_total") == 240
    assert value(m, "cacheblend:generation_tokens_total") == 8
    assert value(m, "cacheblend:tokens_reused_total", mode="cacheblend") == 90
    assert value(m, "cacheblend:tokens_reused_total", mode="full_prefill") == 0  # exists, for the share
    assert value(m, "cacheblend:tokens_recomputed_total", mode="full_prefill") == 120
    assert value(m, "cacheblend:chunk_hits_total", tier="disk") == 1
    assert value(m, "cacheblend:chunk_misses_total") == 1
    assert value(m, "cacheblend:inter_token_latency_seconds_count", mode="cacheblend") == 3
    for phase in ("kv_fetch", "selection", "recompute", "first_decode"):
        assert value(m, "cacheblend:ttft_phase_seconds_count", mode="cacheblend", phase=phase) == 1
    assert value(m, "cacheblend:ttft_phase_seconds_sum", mode="cacheblend", phase="recompute") == pytest.approx(0.02)
    assert value(m, "cacheblend:time_to_first_token_seconds_bucket", mode="cacheblend", le="0.04") == 1
    assert value(m, "cacheblend:time_to_first_token_seconds_bucket", mode="cacheblend", le="0.02") == 0


def test_request_without_mode_counts_status_only():
    m = Metrics("smol")
    m.observe_request(RequestStats(status="rejected"))
    m.observe_request(RequestStats(status="error", mode="cacheblend"))  # failed before any timing
    assert value(m, "cacheblend:requests_total", status="rejected") == 1
    assert value(m, "cacheblend:requests_total", status="error") == 1
    fams = families(m)
    assert not fams["cacheblend:time_to_first_token_seconds"].samples
    assert {s.labels["mode"] for s in fams["cacheblend:tokens_reused"].samples} == {"cacheblend"}


def test_unknown_status_and_direction_are_errors():
    m = Metrics("smol")
    with pytest.raises(ValueError):
        m.observe_request(RequestStats(status="done"))
    with pytest.raises(ValueError):
        m.controller_decision("sideways")


def test_store_totals_become_counter_increments():
    m = Metrics("smol")
    m.observe_store({"cpu": {"hits": 3, "bytes_read": 100, "bytes_used": 50, "capacity": 1000}})
    m.observe_store({"cpu": {"hits": 7, "bytes_read": 160, "bytes_used": 80, "capacity": 1000}})
    assert value(m, "cacheblend:kv_hits_total", tier="cpu") == 7
    assert value(m, "cacheblend:kv_bytes_loaded_total", tier="cpu") == 160
    assert value(m, "cacheblend:kv_bytes_used", tier="cpu") == 80
    # A tier's counters all exist from its first report, even those the store does not report.
    assert value(m, "cacheblend:kv_remote_errors_total", tier="cpu") == 0
    # The store was rebuilt: its totals restarted, so everything it reports now is new.
    m.observe_store({"cpu": {"hits": 2, "bytes_read": 10}})
    assert value(m, "cacheblend:kv_hits_total", tier="cpu") == 9
    assert value(m, "cacheblend:kv_bytes_loaded_total", tier="cpu") == 170
    m.observe_store({"cpu": {"hits": 2}})  # no change, no increment
    assert value(m, "cacheblend:kv_hits_total", tier="cpu") == 9


def test_quality_agreement_is_a_counter_pair():
    m = Metrics("smol")
    m.observe_quality(0.01, True, 1.0)
    m.observe_quality(0.5, False, 0.2)
    m.observe_quality(0.1, 0.75, 0.9)  # a share of compared positions counts as that much
    assert value(m, "cacheblend:quality_samples_total") == 3
    assert value(m, "cacheblend:quality_top1_agreement_total") == 1.75
    assert value(m, "cacheblend:quality_kl_divergence_count") == 3
    assert value(m, "cacheblend:quality_output_f1_sum") == pytest.approx(2.1)


def test_instances_have_separate_registries():
    a, b = Metrics("a"), Metrics("b")
    a.controller_decision("up")
    assert a.registry.get_sample_value("cacheblend:controller_decisions_total", {"model_name": "a", "direction": "up"}) == 1
    assert b.registry.get_sample_value("cacheblend:controller_decisions_total", {"model_name": "b", "direction": "up"}) == 0
    body, content_type = b.render()
    assert content_type.startswith("text/plain")
    assert b'model_name="a"' not in body


@contextlib.contextmanager
def serve_metrics(m: Metrics):
    """A throwaway HTTP server exposing `m` at /metrics; yields "host:port"."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, content_type = m.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_prometheus_harness_scrapes_metrics_and_answers_every_dashboard_query():
    m = populated()
    with serve_metrics(m) as target, start_prometheus([target]) as prometheus:
        wait_for_scrapes(prometheus, scrapes=2)
        ratio = query(prometheus, 'cacheblend:recompute_ratio{model_name="smol"}')
        assert float(ratio[0]["value"][1]) == 0.15
        empty = [expr for expr in dashboard_queries(DASHBOARD) if not query(prometheus, expr)]
        assert not empty
