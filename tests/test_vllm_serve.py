"""Plain `vllm serve` with the CacheBlend connector, driven by the official `openai` client: the
request shape documented in the README (token-ID prompt, `kv_transfer_params.cacheblend`)."""

from __future__ import annotations

import openai
import pytest

from bench.services import start_vllm_server
from engine.loader import convert_embedded

FLAGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--max-num-batched-tokens", "4096",
         "--enable-prefix-caching", "--enable-prompt-tokens-details", "--seed", "0")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, engine):
    model_dir = convert_embedded(engine.settings.data_dir)
    tmp = tmp_path_factory.mktemp("vllm-serve")
    with start_vllm_server(model_dir, tmp, cacheblend={"state_dir": str(tmp / "state")}, flags=FLAGS) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused"), str(model_dir)


def complete(server, ids, blend=None, **kw):
    client, model = server
    extra = {"kv_transfer_params": {"cacheblend": blend}} if blend is not None else None
    return client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0, extra_body=extra, **kw)


def test_openai_client_gets_a_blend_from_vllm_serve(vllm_server, rag):
    ids, chunks, _ = rag[0]
    plain = complete(vllm_server, ids)
    exact = complete(vllm_server, ids, {"chunks": chunks, "recompute_ratio": 1.0})
    assert exact.choices[0].text == plain.choices[0].text
    # the connector provided the blended span (vLLM counts it as cached prompt tokens)
    assert exact.usage.prompt_tokens_details.cached_tokens >= chunks[-1][1] - 128
    text, finish = "", None
    for event in complete(vllm_server, ids, {"chunks": chunks}, stream=True):
        text += event.choices[0].text
        finish = event.choices[0].finish_reason or finish
    assert text and finish in ("stop", "length")


def test_a_request_without_chunks_is_plain_vllm(vllm_server, rag):
    ids, _, _ = rag[1]
    first = complete(vllm_server, ids)
    again = complete(vllm_server, ids)  # vLLM's own prefix cache still serves ordinary prefixes
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens > 0
