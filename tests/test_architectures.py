"""Our layer-by-layer forward matches Hugging Face's on every supported architecture."""

import pytest
import torch

from conftest import full_prefill, tiny_hf_model
from engine.blend import KVCache, PrefillInput, blend_prefill
from engine.request import BlendSpec
from engine.chunks import Precompute, precompute_chunk
from engine.model import Transformer

CASES = [
    ("llama", None),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("llama", {"rope_type": "linear", "factor": 2.0}),
    ("mistral", None),
    ("qwen2", None),
    ("qwen3", None),
]
IDS = ["llama", "llama-llama3", "llama-yarn", "llama-linear", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind,scaling", CASES, ids=IDS)
def test_full_prefill_matches_hf_forward(kind, scaling):
    hf = tiny_hf_model(kind, scaling)
    model = Transformer.from_hf_model(hf, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
    got = full_prefill(model, ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("kind,scaling", CASES, ids=IDS)
def test_ratio_one_matches_full_prefill(kind, scaling):
    model = Transformer.from_hf_model(tiny_hf_model(kind, scaling), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    prefix, suffix = torch.randint(0, 300, (5,), generator=g), torch.randint(0, 300, (7,), generator=g)
    chunks = [torch.randint(0, 300, (n,), generator=g) for n in (20, 33, 17)]
    pre = Precompute("sink", (1,))
    kvs = [precompute_chunk(model, pre, tuple(c.tolist())) for c in chunks]
    ids = torch.cat([prefix, *chunks, suffix])
    spans, pos = [], prefix.numel()
    for c in chunks:
        spans.append((pos, pos + c.numel()))
        pos += c.numel()
    forced = torch.ones(ids.numel(), dtype=torch.bool)
    for s, e in spans:
        forced[s:e] = False
    forced[-1] = True
    inp = PrefillInput(ids, forced, chunk_spans=spans, chunk_layer=lambda l: [(kv.keys[l], kv.values[l]) for kv in kvs])
    blended = blend_prefill(model, inp, BlendSpec((1,), (1.0,)), KVCache.allocate(model, ids.numel()))
    reference = full_prefill(model, ids)
    assert torch.allclose(blended.logits, reference.logits, atol=1e-5, rtol=1e-5)
    L = model.cfg.num_layers
    assert torch.allclose(blended.cache.k[:, :, : ids.numel()], reference.cache.k[:, :, : ids.numel()], atol=1e-5)
    assert blended.stats.computed_per_layer == [ids.numel()] * L


def test_fingerprint_follows_the_weights_not_the_load_path():
    hf = tiny_hf_model("llama")
    cpu = torch.device("cpu")
    first = Transformer.from_hf_model(hf, cpu, torch.float32).fingerprint
    hf.config._name_or_path = "/models/elsewhere"  # another node, another folder: same KV
    assert Transformer.from_hf_model(hf, cpu, torch.float32).fingerprint == first
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # other weights: KV must never be shared
    assert Transformer.from_hf_model(hf, cpu, torch.float32).fingerprint != first


@pytest.mark.parametrize("attention", ["compiled", "torch_ops"])
@pytest.mark.parametrize("kind,scaling", CASES, ids=IDS)
def test_batched_decode_step_matches_hf_forward(kind, scaling, attention, monkeypatch):
    """One decode step for three sequences of different lengths, with either decode attention."""
    from engine import native
    from engine.decode import decode_step

    if attention == "torch_ops":  # what runs where the kernel cannot be built
        monkeypatch.setattr(native, "append_attend_op", lambda: None)
    else:
        assert native.append_attend_op() is not None

    hf = tiny_hf_model(kind, scaling)
    model = Transformer.from_hf_model(hf, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g) for n in (9, 40, 23)]
    caches = [full_prefill(model, p, capacity=p.numel() + 1).cache for p in prompts]  # room for the decoded token
    nxt = [5, 17, 250]
    got = decode_step(model, caches, nxt)
    with torch.no_grad():
        ref = torch.stack([hf(torch.cat([p, torch.tensor([t])])[None]).logits[0, -1] for p, t in zip(prompts, nxt)])
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert [c.length for c in caches] == [p.numel() + 1 for p in prompts]
