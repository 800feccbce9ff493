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


def test_bench_conversation_reports_turn_reuse_per_turn(tmp_path, capsys):
    out = tmp_path / "conversation.json"
    assert main(["bench", "conversation", "--dataset", str(DATASET), "--questions", "0-3", "--window", "1",
                 "--passages", "1", "--max-tokens", "4", "--variants", "prefix_cache,cacheblend,full_reuse",
                 "--dtype", "float32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["variant"], r["turn"]): r for r in result["rows"]}
    assert len(rows) == 12 and all(r["ttft_s"] > 0 for r in rows.values())
    # turn 3 on: the window has slid, prefix caching finds only the system prompt, turns are blended back
    assert rows["cacheblend", 3]["turn_tokens"] > 0 and rows["prefix_cache", 3]["turn_tokens"] == 0
    assert rows["cacheblend", 4]["tokens_recomputed"] < rows["prefix_cache", 4]["tokens_recomputed"]
    assert result["summary"]["from_turn"] == 3 and set(result["summary"]["kl_mean"]) == {"cacheblend", "full_reuse"}


def test_inspect_prints_selection_and_writes_histogram(tmp_path, capsys):
    png = tmp_path / "hkvd.png"
    assert main(["inspect", "--dataset", str(DATASET), "--passages", "2", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "check layer 0: HKVD" in text and "selected stored sensitivity x question's attention" in text and "ttft" in text
    where = float(text.split("mean position ")[1].split()[0])
    assert 0 < where < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_selection_compares_predictors_on_one_question(tmp_path, capsys):
    out = tmp_path / "selection.json"
    assert main(["bench", "selection", "--dataset", str(DATASET), "--limit", "1", "--passages", "2", "--json", str(out)]) == 0
    rows = {r["predictor"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"full_reuse", "value", "sensitivity", "oracle_L1-1", "oracle_L5-8", "pooled_oracle"} <= set(rows)
    assert rows["full_reuse"]["vs_full_reuse"] == 1.0 and rows["full_reuse"]["kl"] > 0
    assert all(r["kl"] >= 0 and r["n"] == 1 for r in rows.values())
    assert "pooled_oracle" in capsys.readouterr().out


def test_token_scores_decide_what_the_check_layer_keeps(engine):
    """The selection study's hook: caller-given scores replace the KV deviation at the check layer."""
    import torch

    from conftest import PASSAGES, QUESTION
    from engine.request import BlendParams

    chunks = [engine.chunk_from_text(p) for p in PASSAGES]
    segs = engine.chat_segments([{"role": "user", "content": QUESTION}], chunks)
    N, n = sum(len(s) for s in segs), sum(len(c) for c in chunks)
    scores = torch.arange(N, dtype=torch.float32).flip(0)  # favours the earliest chunk tokens
    engine.prefix_cache.clear()
    blend = BlendParams(mode="cacheblend", recompute_ratio=0.1, selection_signal="sensitivity")  # scores win over any signal
    st = engine.prefill(segs, blend, token_scores=scores).result.stats
    k = -(-n // 10)
    assert st.selected[1] == st.candidates[1][:k]


def test_bench_attention_times_both_decode_attentions(tmp_path, capsys):
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--tokens", "64", "--dtypes", "float32", "--repeat", "1", "--decode-batch", "2",
                 "--decode-tokens", "16", "--json", str(out)]) == 0
    med = json.loads(out.read_text())["median_s"]
    decode = {k.rsplit(": ", 1)[1]: v for k, v in med.items() if "decode step" in k}
    assert set(decode) == {"torch ops", "compiled"} and all(v > 0 for v in decode.values())


def test_bench_decode_times_steps_on_packed_and_plain_weights(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--batches", "1,2", "--context", "32", "--steps", "2", "--repeat", "1",
                 "--json", str(out)]) == 0
    best = json.loads(out.read_text())["best_s"]
    assert set(best) == {f"batch {b}: {w}" for b in (1, 2) for w in ("plain", "packed")} and all(v > 0 for v in best.values())


def test_bench_batch_computes_the_same_rows_batched_as_separately(engine, tmp_path, capsys):
    import torch

    from bench.batch_micro import _Prefill, batched, separate

    g = torch.Generator().manual_seed(0)
    prefills = [_Prefill(engine.model, 200, rows, g) for rows in (16, 40)]  # two requests, rows scattered
    together, alone = batched(engine.model, prefills), separate(engine.model, prefills)
    # the same math in GEMMs of other shapes: rounding apart, over 30 layers (hidden values reach ~7,000)
    assert float(((together - alone).norm(dim=1) / alone.norm(dim=1)).max()) < 1e-2
    out = tmp_path / "batch.json"
    assert main(["bench", "batch", "--tokens", "128", "--rows", "16", "--requests", "2", "--repeat", "1",
                 "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["median_s"]) == {"2 x 16 rows: separate", "2 x 16 rows: batched"}


def test_bench_kernels_compares_the_compiled_kernels_with_torch_ops(tmp_path, capsys):
    import pytest

    from engine import device, native

    if "avx512_bf16" not in device.cpu_bf16_flags():
        pytest.skip("the bf16 kernels need a CPU with AVX512-BF16")
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--dataset", str(DATASET), "--questions", "0", "--passages", "2",
                 "--dtype", "bfloat16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ttft_median_s"]) == {f"{m} {b}" for m in ("cacheblend", "full_prefill") for b in ("kernels", "torch")}
    assert all(v > 0 for v in result["ttft_median_s"].values())
    # the kernels change a full prefill's first token by bf16 rounding only, far less than blending does
    assert result["kl_mean"]["full prefill: kernels vs torch"] < 0.01
    assert native.blend_attend_op() is not None and native.append_attend_op() is not None  # restored
