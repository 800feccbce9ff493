"""The benchmark and inspect commands run end to end on a small prompt (so they cannot rot)."""

import json

from cacheblend.cli import main
from conftest import DATASET


def test_bench_ttft_writes_one_row_per_mode(tmp_path, capsys):
    out = tmp_path / "ttft.json"
    assert main(["bench", "ttft", "--dataset", str(DATASET), "--context-tokens", "400", "--chunks", "2",
                 "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["full_prefill", "prefix_cache", "full_reuse", "cacheblend"]
    for r in rows:
        assert r["context_tokens"] > 300 and r["ttft_median_s"] > 0
        assert {"kv_fetch_median_s", "selection_median_s", "recompute_median_s", "first_decode_median_s"} <= set(r)
    full, blend = rows[0], rows[3]
    assert blend["tokens_recomputed"] < full["tokens_recomputed"]


def test_inspect_prints_selection_and_writes_histogram(tmp_path, capsys):
    png = tmp_path / "hkvd.png"
    assert main(["inspect", "--dataset", str(DATASET), "--passages", "2", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "check layer 1: HKVD" in text and "ttft" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
