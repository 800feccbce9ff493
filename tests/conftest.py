"""Shared fixtures: the real embedded model (loaded once) and tiny random HF models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))

DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_s.json"


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    """Defaults, except the disk tier lives in a temp folder (tests leave nothing behind) and the
    compute is float32 (tests compare against Hugging Face's float32 reference; `auto` would take
    bf16 on a CPU with native bf16 dot products)."""
    from config import Settings

    return Settings(kv_disk_path=tmp_path_factory.mktemp("kv"), dtype="float32")


@pytest.fixture(scope="session")
def engine(settings):
    """The embedded SmolLM2-135M-Instruct on CPU with an in-process chunk store."""
    from engine.llm_engine import LLMEngine

    return LLMEngine(settings)


@pytest.fixture
def fresh_prefix_cache(engine):
    engine.prefix_cache.clear()
    yield
    engine.prefix_cache.clear()


PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of Gustave Eiffel and completed in 1889 for the World's Fair.\n\n",
    "Gustave Eiffel was a French civil engineer born in Dijon in 1832. His company also built the internal frame of the Statue of Liberty in New York.\n\n",
    "Dijon is a city in eastern France, the capital of the Côte-d'Or department. It is famous for its mustard, which has been produced there since the Middle Ages.\n\n",
]
QUESTION = "In which city was the engineer whose company built the Eiffel Tower born? Answer briefly."


def full_prefill(model, ids: torch.Tensor, capacity: int = 0):
    """Every token of `ids` [N] computed at every layer: the reference the blend is checked against
    (its `.cache`, of max(N, capacity) positions, holds the post-RoPE K, V; `.logits` the last token's)."""
    from engine.blend import KVCache, PrefillInput, blend_prefill
    from engine.request import BlendSpec

    return blend_prefill(model, PrefillInput(ids, torch.ones(ids.numel(), dtype=torch.bool)), BlendSpec(),
                         KVCache.allocate(model, max(ids.numel(), capacity)))


def tiny_hf_model(kind: str, rope_scaling: dict | None = None, seed: int = 0):
    """A small random model of the given architecture (Hugging Face reference implementation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "llama":
        extra = {"rope_theta": 10000.0}
        if rope_scaling:
            extra["rope_scaling"] = rope_scaling
    elif kind == "mistral":
        extra = {"sliding_window": None}
    elif kind == "qwen2":
        extra = {"use_sliding_window": False}
    elif kind == "qwen3":
        extra = {"head_dim": 32, "use_sliding_window": False}
    else:
        raise ValueError(kind)
    config = AutoConfig.for_model(kind, **common, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if kind == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if kind == "qwen3":
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_norm.weight, mean=1.0, std=0.3)
            torch.nn.init.normal_(layer.self_attn.k_norm.weight, mean=1.0, std=0.3)
    return model


@pytest.fixture(scope="session")
def rag(engine):
    """[(token IDs, chunk spans, segments)] of dev questions 0-3 with 2 passages each, for the
    native engine and vLLM alike (the same token IDs)."""
    from bench.dataset import chunk_texts, load, messages_for
    from engine.segments import spans

    out = []
    for rec in load(DATASET)[:4]:
        chunks = [engine.chunk_from_text(t) for t in chunk_texts(rec, 2)]
        segs = engine.chat_segments(messages_for(rec), chunks)
        ids = [t for s in segs for t in s.token_ids]
        out.append((ids, [list(x) for s, x in zip(segs, spans(segs)) if s.kind == "chunk"], segs))
    return out
