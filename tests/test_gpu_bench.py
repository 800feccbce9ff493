"""bench/gpu_ttft.py dry run: the GPU script on the CPU with a tiny 2-layer model, so it cannot rot."""

from __future__ import annotations

import json

import torch

from bench import gpu_checks, gpu_model, gpu_ttft
from cacheblend.cli import main as cli_main


def test_dry_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "gpu_ttft.md"
    rc = cli_main(["bench", "gpu", "--dry-run", "--repeat", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    md = out.read_text()
    assert md.startswith("# TTFT, tiny 2-layer model (dry run)")
    assert "| context tokens |" in md and "cacheblend[device]" in md and "cacheblend[cpu]" in md

    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    assert [r["context_tokens"] for r in rows] == [64 + 2 * gpu_ttft.FIXED_TOKENS, 128 + 2 * gpu_ttft.FIXED_TOKENS]
    for r in rows:
        for label in ("full_prefill", "cacheblend[device]", "cacheblend[cpu]"):
            cell = r[label]
            assert cell["ttft_median_ms"] > 0 and len(cell["ttft_all_ms"]) == 2
            assert cell["speedup_vs_full_prefill"] > 0
        assert r["full_prefill"]["tokens_recomputed"] == r["context_tokens"]
        assert r["cacheblend[device]"]["tokens_recomputed"] < r["context_tokens"]  # selective recompute after layer 0
        assert r["cacheblend[cpu]"]["tokens_recomputed"] == r["cacheblend[device]"]["tokens_recomputed"]
    assert res["info"]["dry_run"] and res["info"]["shape"]["num_hidden_layers"] == 2
    checks = res["info"]["checks"]
    assert checks["attention"]["max_abs_error_vs_float64"] < 1e-5  # fp32 on the CPU
    assert checks["ratio_one"]["first_token_equal"] and checks["ratio_one"]["max_abs_logit_diff"] < 1e-4
    assert "Checks: selected-query attention" in md


def test_reference_attention_is_causal_per_query():
    """The float64 reference of the GPU check: a query at position p never sees a later key."""
    q_pos = torch.tensor([0, 3])
    q = torch.randn(2, 2, 4)
    k, v = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    v_later = v.clone()
    v_later[:, 4] += 100.0  # no query sits at 4
    out = gpu_checks.reference_attention(q, k, v, q_pos)
    assert torch.equal(out, gpu_checks.reference_attention(q, k, v_later, q_pos))
    assert torch.allclose(out[:, 0], v[0, 0].double().expand(2, 4))  # position 0 sees only itself


def test_random_weights_have_the_mistral_shape_names():
    w = gpu_model.random_state_dict(gpu_model.TINY, torch.device("cpu"), torch.float32, seed=0)
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert w["lm_head.weight"].shape == (256, 64)
    cfg = gpu_model.hf_config(gpu_model.MISTRAL_7B, 40000)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.sliding_window) == (32, 4096, 32, 8, 14336, 32000, None)


def test_vllm_dry_run_measures_the_vllm_backend_on_a_written_random_model(tmp_path):
    """`bench gpu --vllm` on the CPU: a random tiny Llama written to disk with the embedded
    tokenizer, then vLLM alone, with prefix caching, with the connector, and the native engine."""
    out = tmp_path / "gpu_ttft.md"
    assert cli_main(["bench", "gpu", "--vllm", "--dry-run", "--out", str(out)]) == 0
    model_dir = tmp_path / "gpu-vllm-tiny"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    median = json.loads(out.with_suffix(".vllm.json").read_text())["median_s"]
    assert set(median) == {"vllm:full_prefill", "vllm:prefix_caching", "vllm:cacheblend@0.15", "native:full_prefill",
                           "native:cacheblend@0.15"}
    assert all(v > 0 for v in median.values())
