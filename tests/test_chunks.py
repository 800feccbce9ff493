"""Chunk precompute conventions: which run's KV is stored, and the sensitivity beside it."""

import torch

from conftest import full_prefill, tiny_hf_model
from engine.chunks import Precompute, precompute_chunk
from engine.model import Transformer


def kv_behind(model, context, chunk):
    """Post-RoPE K and V of `chunk` at every layer, computed directly behind `context`: [L, Hkv, T, D]."""
    cache = full_prefill(model, torch.tensor(context + chunk)).cache
    return cache.k[:, :, len(context):], cache.v[:, :, len(context):]


def test_passage_convention_stores_the_run_behind_the_probe():
    model = Transformer.from_hf_model(tiny_hf_model("llama"), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(4)
    prefix, probe, chunk = (tuple(torch.randint(0, 300, (n,), generator=g).tolist()) for n in (6, 40, 25))

    passage = precompute_chunk(model, Precompute("passage", prefix, probe), chunk)
    plain = precompute_chunk(model, Precompute("prefix", prefix, probe), chunk)

    k_probed, v_probed = kv_behind(model, prefix + probe, chunk)
    positions = torch.arange(len(prefix + probe), len(prefix + probe + chunk))
    placed = torch.stack([model.rotate(k, positions, positions[-1].item() + 1) for k in passage.keys])
    assert torch.allclose(placed, k_probed, atol=1e-5)
    assert torch.allclose(passage.values, v_probed, atol=1e-6)
    _, v_plain = kv_behind(model, prefix, chunk)
    assert torch.allclose(plain.values, v_plain, atol=1e-6)
    assert not torch.allclose(passage.values[1:], plain.values[1:], atol=1e-3)  # the passage moved them
    # the same two runs: the same sensitivity, whichever run is stored
    assert torch.allclose(passage.sensitivity, plain.sensitivity)
    assert Precompute("passage", prefix, probe).tag != Precompute("prefix", prefix, probe).tag
    # without a probe (a signal that reads no sensitivity) the passage is part of the context
    alone = precompute_chunk(model, Precompute("passage", prefix + probe), chunk)
    assert torch.allclose(alone.values, passage.values, atol=1e-6) and alone.sensitivity is None
