"""Compute dtype: how `auto` chooses, and what bf16 compute costs in quality on the real model."""

import logging

import torch

from conftest import PASSAGES, QUESTION
from engine import device
from engine.request import BlendParams


def test_bf16_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert device.cpu_bf16_flags(info) == ["avx512_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert device.cpu_bf16_flags(info) == []
    assert device.cpu_bf16_flags(tmp_path / "absent") == []


def test_auto_takes_bf16_only_where_native_in_the_cpu_and_in_torch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: [])
    assert device.auto_dtype(cpu)[0] == torch.float32
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: ["amx_bf16"])
    monkeypatch.setattr(device, "onednn_bf16", lambda: True)
    assert device.auto_dtype(cpu) == (torch.bfloat16, "CPU has amx_bf16")
    monkeypatch.setattr(device, "onednn_bf16", lambda: False)
    assert device.auto_dtype(cpu)[0] == torch.float32


def test_auto_is_the_same_choice_however_busy_the_machine():
    """Replicas sharing a KV store must agree on its format: no start-up timing decides it."""
    cpu = torch.device("cpu")
    assert len({device.auto_dtype(cpu) for _ in range(3)}) == 1
    assert device.auto_dtype(cpu)[0] == (torch.bfloat16 if device.cpu_bf16_flags() and device.onednn_bf16()
                                         else torch.float32)


def test_choice_logged_once_with_reason(monkeypatch, caplog):
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: [])
    with caplog.at_level(logging.INFO, logger="engine.device"):
        assert device.resolve_dtype("auto", torch.device("cpu")) == torch.float32
        assert device.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("compute dtype float32 (auto: CPU lacks bf16")
    assert lines[1] == "compute dtype bfloat16 (set explicitly)"


def _kl(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


def _first_token_logits(engine, **blend):
    segs = engine.chat_segments([{"role": "user", "content": QUESTION}], [engine.chunk_from_text(p) for p in PASSAGES])
    engine.prefix_cache.clear()
    return engine.prefill(segs, BlendParams(**blend)).result.logits


def test_bf16_changes_quality_far_less_than_reuse(settings):
    """KL(fp32 full prefill || bf16 full prefill) is at most a tenth of full_reuse's; ratio 1.0 is
    still exactly a full prefill in bf16."""
    from engine.llm_engine import LLMEngine

    fp32 = LLMEngine(settings.model_copy(update={"dtype": "float32", "kv_disk_bytes": 0}))
    bf16 = LLMEngine(settings.model_copy(update={"dtype": "bfloat16", "kv_disk_bytes": 0}))
    assert bf16.model.dtype == torch.bfloat16 and bf16.model.lm_head.dtype == torch.float32
    full32 = _first_token_logits(fp32, mode="full_prefill")
    reuse32 = _first_token_logits(fp32, mode="full_reuse")
    full16 = _first_token_logits(bf16, mode="full_prefill")
    assert full16.dtype == torch.float32
    assert _kl(full32, full16) <= 0.1 * _kl(full32, reuse32)
    assert full16.argmax() == full32.argmax()
    blend16 = _first_token_logits(bf16, mode="cacheblend", recompute_ratio=1.0)
    assert _kl(full16, blend16) < 1e-6


def test_few_row_linear_on_the_packed_weight_matches_the_plain_one():
    from engine.model import FEW_ROWS, linear, pack_weight

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
        packed = pack_weight(w)
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert packed is None  # oneDNN would emulate bf16 here: the plain path is kept
            continue
        assert packed is not None
        for rows in (1, 8, FEW_ROWS):
            x = torch.randn(rows, 64).to(dtype)
            want = torch.nn.functional.linear(x.float(), w.float(), b.float())
            got = linear(x, w, b, packed)
            assert got.dtype == dtype and got.shape == (rows, 96)
            # bf16: inputs exact in both, fp32 accumulation, one rounding of the output
            torch.testing.assert_close(got.float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
