"""RoPE placement: a chunk's layer-0 KV computed at position 0 and moved to p equals computing it at p."""

import pytest
import torch

from conftest import full_prefill, tiny_hf_model
from engine.chunks import Precompute, precompute_chunk
from engine.model import Transformer


def layer0_at(model, filler, chunk):
    """Post-RoPE layer-0 K, V of `chunk` computed directly behind `filler` tokens."""
    cache = full_prefill(model, torch.cat([filler, chunk])).cache
    p = filler.numel()
    return cache.k[0, :, p:], cache.v[0, :, p:]


def check_placement(model, p):
    g = torch.Generator().manual_seed(3)
    vocab = model.cfg.vocab_size
    chunk = torch.randint(0, vocab, (24,), generator=g)
    kv = precompute_chunk(model, Precompute("sink", (1,)), tuple(chunk.tolist()))
    k_direct, v_direct = layer0_at(model, torch.randint(0, vocab, (p,), generator=g), chunk)
    positions = torch.arange(p, p + chunk.numel())
    placed = model.rotate(kv.keys[0], positions, p + chunk.numel())
    assert torch.allclose(placed, k_direct, atol=1e-5), (placed - k_direct).abs().max()
    assert torch.allclose(kv.values[0], v_direct, atol=1e-6)


@pytest.mark.parametrize("p", [1, 37, 300])
def test_placement_real_model(engine, p):
    check_placement(engine.model, p)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0},
], ids=["llama3", "yarn", "dynamic"])
def test_placement_with_rope_scaling(scaling):
    model = Transformer.from_hf_model(tiny_hf_model("llama", scaling), torch.device("cpu"), torch.float32)
    for p in (5, 200):
        check_placement(model, p)
