"""`bench peer` defaults to vLLM's fastest CPU configuration and reports decode speed (no vLLM needed)."""

import argparse

from bench import peer


def test_defaults_are_compiled_and_auto_dtype():
    p = argparse.ArgumentParser()
    peer.register(p.add_subparsers())
    args = p.parse_args(["peer"])
    assert args.vllm_compile is True and args.vllm_dtype == "auto"
    assert p.parse_args(["peer", "--no-vllm-compile"]).vllm_compile is False
    assert [int(b) for b in args.decode_batches.split(",")] == [1, 8]


def test_report_names_the_vllm_configuration_and_decode_ratio():
    r = {"questions": 1, "repeat": 3, "prompt_tokens_mean": 6296, "passages": 10, "first_token_agreement": 1.0,
         "ttft_median_s": {"ours:cacheblend@0.15": 2.0}, "ratio": 0.15, "cacheblend_speedup_vs_vllm_full": 4.0,
         "cacheblend_speedup_vs_vllm_prefix_caching": 3.9, "cacheblend_speedup_vs_our_full": 3.5, "our_full_vs_vllm_full": 1.0,
         "config": {"vllm_configuration": "compiled, float32 (auto: no bf16)", "our_dtype": "torch.float32"},
         "decode_tokens_per_s_median": {"ours:batch1": 20.0, "vllm:batch1": 25.0, "ours:batch8": 60.0, "vllm:batch8": 120.0},
         "decode_prompt_tokens": 512, "decode_tokens": 64}
    text = peer.format_result(r)
    assert "vLLM configuration: compiled, float32 (auto: no bf16)" in text
    assert "batch  1: ours 20.0, vLLM 25.0 (ours / vLLM 0.80)" in text
    assert "batch  8: ours 60.0, vLLM 120.0 (ours / vLLM 0.50)" in text
