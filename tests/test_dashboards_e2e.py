"""End to end: the real server, scraped by a real Prometheus, answers every Grafana dashboard
query with data after a few requests in two modes (quality sampling and the controller on)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from prometheus_service import dashboard_queries, query, start_prometheus, wait_for_scrapes

TESTS = Path(__file__).resolve().parent
DASHBOARD = TESTS.parent / "docker" / "grafana" / "dashboards" / "cacheblend.json"

CHUNKS = [
    {"text": "The Lighthouse of Alexandria was built in the third century BC on the island of Pharos."},
    {"text": "It stood over a hundred metres tall and guided ships into the harbour for centuries."},
    {"text": "Earthquakes damaged it between 956 and 1323, and its stones were later reused in a fort."},
]
QUESTION = "Where was the Lighthouse of Alexandria built?"


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_the_real_server():
    if not (TESTS / "server_process.py").exists():
        pytest.skip("tests/server_process.py (start_server) not written yet")
    from openai import OpenAI
    from server_process import start_server

    # Every request is also run with full_prefill, and the controller decides after each one,
    # so the quality and controller panels have data too.
    settings = dict(quality_sample_rate=1.0, controller_enabled=True, controller_window=1)
    with start_server(**settings) as base_url, \
            start_prometheus([urllib.parse.urlsplit(base_url).netloc]) as prometheus:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        for mode in ("cacheblend", "full_prefill"):
            for stream in (False, True):  # the second request finds the chunks in the store
                extra = {"chunks": CHUNKS, "cacheblend": {"mode": mode}}
                response = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=8, temperature=0, stream=stream, extra_body=extra)
                if stream:
                    assert any(event.choices and event.choices[0].delta.content for event in response)
                else:
                    assert response.choices[0].message.content
        wait_for_scrapes(prometheus, scrapes=2)
        empty = [expr for expr in dashboard_queries(DASHBOARD) if not query(prometheus, expr)]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
