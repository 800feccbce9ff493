"""What the vLLM backend hands to vLLM, alone: a resolved request's chunk spans and sampling,
the stats it reads back, and the engine arguments the server's settings map to."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Settings
from engine.request import BlendParams
from engine.resolve import resolve_request
from engine.sampling import SamplingParams
from engine.segments import Segment
from engine.stats import RequestStats
from engine.vllm_config import CONNECTOR, WORKER_EXTENSION, connector_settings, engine_args
from server.vllm_async_engine import blend_params, finish_stats, vllm_inputs

SEGMENTS = (Segment("prefix", (1, 2, 3)), Segment("chunk", (4, 5, 6, 7), "k1"), Segment("chunk", (8, 9), "k2"),
            Segment("suffix", (10, 11)))


def request(segments=SEGMENTS, salt="", **blend):
    sampling = SamplingParams(max_tokens=4, temperature=0.0, stop=["x"], top_k=-1)
    return resolve_request("r", segments, sampling, BlendParams(**blend), Settings(), 30, 0.15, 1024, "messages", salt=salt)


def test_chunks_become_token_spans_with_the_resolved_blend():
    params = blend_params(request(recompute_ratio=0.3, check_layers=[1, 4]))
    assert params == {"chunks": [[3, 7], [7, 9]], "mode": "cacheblend", "check_layers": [1, 4], "check_ratios": [0.3, 0.3],
                      "selection_signal": "attended"}
    assert blend_params(request(mode="full_reuse")) == {"chunks": [[3, 7], [7, 9]], "mode": "full_reuse"}
    # no blend: vLLM alone (its prefix cache for prefix_cache, none for full_prefill)
    assert blend_params(request(mode="prefix_cache")) is None and blend_params(request(mode="full_prefill")) is None
    assert blend_params(request(SEGMENTS[:1] + SEGMENTS[3:])) is None
    # a chunk that ends the prompt is left to vLLM, which must compute the last prompt token
    assert blend_params(request(SEGMENTS[:3]))["chunks"] == [[3, 7]]
    # chunks keyed with another salt than the request's (a shared chunk: none) say theirs
    assert "salts" not in blend_params(request(salt=""))
    shared = (SEGMENTS[0], Segment("chunk", (4, 5, 6, 7), "k1", "t"), Segment("chunk", (8, 9), "k2", ""), SEGMENTS[3])
    assert blend_params(request(shared, salt="t"))["salts"] == ["t", ""]


def test_vllm_inputs_carry_the_tokens_salt_sampling_and_blend():
    prompt, params = vllm_inputs(request(salt="tenant-a"), default_seed=7)
    assert prompt == {"prompt_token_ids": list(range(1, 12)), "cache_salt": "tenant-a"}
    assert params.max_tokens == 4 and params.temperature == 0.0 and params.top_k == 0 and params.stop == ["x"]
    assert params.seed == 7  # unseeded requests get the server's seed, as on the native engine
    assert params.extra_args["kv_transfer_params"]["cacheblend"]["chunks"] == [[3, 7], [7, 9]]
    prompt, params = vllm_inputs(request(mode="full_prefill"), default_seed=7)
    assert "cache_salt" not in prompt and params.extra_args is None and params.skip_reading_prefix_cache


def test_stats_from_the_connector_record_or_vllm_cache_hit():
    req = request()
    st = RequestStats(prompt_tokens=11)
    record = {"tokens_reused": 5, "tokens_recomputed": 5, "chunk_tokens": 5, "chunk_hits": {"cpu": 2}}
    finish_stats(st, req, 10, {"cacheblend": record})
    # the blend covered 10 tokens; vLLM computed the last one
    assert (st.tokens_reused, st.tokens_recomputed, st.chunk_hits) == (5, 6, {"cpu": 2})
    st = RequestStats(prompt_tokens=11)
    finish_stats(st, req, 3, None)
    assert (st.exact_tokens, st.tokens_reused, st.tokens_recomputed) == (3, 3, 8)


def test_engine_args_follow_the_settings_and_the_overrides():
    settings = Settings(max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=1024, seed=3, recompute_ratio=0.2,
                        port=9000, backend="vllm", vllm_engine_args='{"enforce_eager": true, "max_num_seqs": 8}')
    args = engine_args(settings, Path("/m"), "float32")
    assert args["model"] == "/m" and args["dtype"] == "float32" and args["max_model_len"] == 2048
    assert args["max_num_batched_tokens"] == 1024 and args["seed"] == 3 and args["enable_prefix_caching"]
    assert args["enforce_eager"] is True and args["max_num_seqs"] == 8  # the operator's overrides win
    assert args["worker_extension_cls"] == WORKER_EXTENSION
    kv = args["kv_transfer_config"]
    assert {k: kv[k] for k in CONNECTOR} == CONNECTOR
    # the connector gets the blend's settings, by the same names, and none of the server's own
    extra = kv["kv_connector_extra_config"]
    assert extra["recompute_ratio"] == 0.2 and extra["max_num_batched_tokens"] == 1024
    assert "port" not in extra and "backend" not in extra and "vllm_engine_args" not in extra
    assert Settings(**extra) == Settings(**connector_settings(settings))


def test_bad_vllm_engine_args_are_refused():
    with pytest.raises(ValueError):
        Settings(vllm_engine_args="{not json")
    with pytest.raises(ValueError):
        Settings(vllm_engine_args="[1, 2]")
