"""JSON log lines carry the request ID and tenant; DEBUG logs carry each request's TTFT breakdown."""

import json
import logging

from conftest import PASSAGES, QUESTION
from engine.sampling import SamplingParams
from server.cli import JSONFormatter


def test_json_formatter_includes_request_id():
    record = logging.LogRecord("engine", logging.INFO, __file__, 1, "finished %s", ("r1",), None)
    record.request_id, record.tenant = "chatcmpl-1", "team-a"
    line = json.loads(JSONFormatter().format(record))
    assert line["request_id"] == "chatcmpl-1" and line["message"] == "finished r1" and line["level"] == "INFO"
    assert line["tenant"] == "team-a"


def test_debug_log_has_ttft_breakdown(engine, caplog):
    segs = engine.chat_segments([{"role": "user", "content": QUESTION}], [engine.chunk_from_text(PASSAGES[0])])
    with caplog.at_level(logging.DEBUG, logger="engine.llm_engine"):
        engine.generate([engine.make_request("log-1", segs, SamplingParams(max_tokens=2, temperature=0))])
    rec = next(r for r in caplog.records if getattr(r, "request_id", None) == "log-1")
    assert rec.tenant == "default"  # next to the request ID, the tenant (never its key)
    for key in ("ttft_s=", "queue_s=", "kv_fetch_s=", "selection_s=", "recompute_s=", "first_decode_s="):
        assert key in rec.getMessage()
