"""Exact causal attention for scattered query positions, against a brute-force reference."""

import math

import pytest
import torch

from conftest import tiny_hf_model
from engine import attention
from engine.attention import CausalPlan, causal_attention, decode_attention
from engine.model import Transformer


def brute_force(q, k, v, q_pos):
    """Per query: softmax over exactly the keys at positions <= its own."""
    H, Hkv = q.shape[0], k.shape[0]
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh = k[h // (H // Hkv)], v[h // (H // Hkv)]
        for i, p in enumerate(q_pos.tolist()):
            scores = kh[: p + 1] @ q[h, i] / math.sqrt(q.shape[-1])
            out[h, i] = torch.softmax(scores.double(), 0).float() @ vh[: p + 1]
    return out


# bf16: the kernel accumulates in fp32 but rounds its output to bf16 (8 mantissa bits, values ~1)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [4, 128])
def test_scattered_queries_match_brute_force(monkeypatch, block, dtype):
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    N, D = 90, 16
    q_pos = torch.sort(torch.randperm(N, generator=g)[:23]).values
    q = torch.randn(4, q_pos.numel(), D, generator=g).to(dtype)
    k, v = torch.randn(2, N, D, generator=g).to(dtype), torch.randn(2, N, D, generator=g).to(dtype)
    got = causal_attention(q, k, v, CausalPlan(q_pos, N, q.dtype))
    assert got.dtype == dtype
    # the reference sees the very same (rounded) inputs, in fp32 with a float64 softmax
    assert torch.allclose(got.float(), brute_force(q.float(), k.float(), v.float(), q_pos), atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_positions_use_causal_path(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(h, 30, 8, generator=g).to(dtype) for h in (4, 2, 2))
    got = causal_attention(q, k, v, CausalPlan(torch.arange(30), 30, q.dtype))
    assert torch.allclose(got.float(), brute_force(q.float(), k.float(), v.float(), torch.arange(30)), atol=ATOL[dtype])


def test_exact_mask_on_tiny_model_layer(monkeypatch):
    """Real q/k/v from a tiny random model's layer; a subset of positions as queries."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    model = Transformer.from_hf_model(tiny_hf_model("llama"), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    N = 64
    ids = torch.randint(0, 300, (N,), generator=g)
    q, k, v = model.qkv(0, model.embed(ids))
    pos = torch.arange(N)
    q, k = model.rotate(q, pos, N), model.rotate(k, pos, N)
    q_pos = torch.tensor([0, 3, 4, 5, 17, 18, 40, 63])
    got = causal_attention(q[:, q_pos], k, v, CausalPlan(q_pos, N, q.dtype))
    assert torch.allclose(got, brute_force(q[:, q_pos], k, v, q_pos), atol=1e-5)
    # and the rows equal full causal attention's rows at those positions
    full = causal_attention(q, k, v, CausalPlan(pos, N, q.dtype))
    assert torch.allclose(got, full[:, q_pos], atol=1e-5)


def test_folded_query_heads_match_brute_force(monkeypatch):
    """The CUDA layout (each KV head's query heads folded into one call's rows), forced on CPU."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    monkeypatch.setattr(attention, "_fold_groups", lambda q: True)
    g = torch.Generator().manual_seed(3)
    N, D = 70, 16
    q_pos = torch.sort(torch.randperm(N, generator=g)[:19]).values
    q = torch.randn(6, q_pos.numel(), D, generator=g)
    k, v = torch.randn(2, N, D, generator=g), torch.randn(2, N, D, generator=g)
    plan = CausalPlan(q_pos, N, q.dtype)
    assert torch.allclose(causal_attention(q, k, v, plan), brute_force(q, k, v, q_pos), atol=1e-5)
    assert all(b.folded.shape == (3 * (b.stop - b.start), b.keys) for b in plan.blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_query_sees_its_whole_cache(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(6, 16, generator=g).to(dtype), torch.randn(2, 41, 16, generator=g).to(dtype), torch.randn(2, 41, 16, generator=g).to(dtype)
    out = torch.empty(6, 16, dtype=dtype)
    got = decode_attention(q * 16 ** -0.5, k, v, out=out)  # the caller scales q, once per batch
    assert got is out and got.dtype == dtype
    ref = brute_force(q.float()[:, None], k.float(), v.float(), torch.tensor([40]))[:, 0]
    assert torch.allclose(got.float(), ref, atol=ATOL[dtype])


def _decode_batch(dtype, positions, H=6, Hkv=2, D=16, L=3, capacity=64, seed=5):
    """A decode step's inputs for a batch with caches of different lengths (random K/V)."""
    g = torch.Generator().manual_seed(seed)
    B = len(positions)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    q = rand(B, H, D).transpose(0, 1) * D ** -0.5  # [H, B, D], strided as the model makes it
    k_new, v_new = rand(B, Hkv, D).transpose(0, 1), rand(B, Hkv, D).transpose(0, 1)
    k_caches = [rand(L, Hkv, capacity, D) for _ in range(B)]
    v_caches = [rand(L, Hkv, capacity, D) for _ in range(B)]
    return q, k_new, v_new, k_caches, v_caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_appends_and_attends_as_the_torch_ops(dtype):
    from engine.native import append_attend_op

    op = append_attend_op()
    assert op is not None, "the C++ decode kernel must build on the test machine (g++, Python headers, ninja)"
    positions, layer = [0, 37, 5, 63], 1
    q, k_new, v_new, k_caches, v_caches = _decode_batch(dtype, positions)
    ref_k, ref_v = [t.clone() for t in k_caches], [t.clone() for t in v_caches]
    want = torch.empty(4, 6, 16, dtype=dtype)
    attention.append_attend_torch(q, k_new, v_new, ref_k, ref_v, positions, layer, want)
    got = torch.full((4, 6, 16), float("nan"), dtype=dtype)
    op(q, k_new, v_new, k_caches, v_caches, positions, layer, got)
    # the new K/V land at each sequence's position, in its own cache, and nowhere else
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, ref_k + ref_v))
    assert torch.allclose(got.float(), want.float(), atol=ATOL[dtype])
    for b, p in enumerate(positions):  # and both match the brute-force reference
        ref = brute_force(q[:, b].float()[:, None] * 4, k_caches[b][layer].float(), v_caches[b][layer].float(), torch.tensor([p]))[:, 0]
        assert torch.allclose(got[b].float(), ref, atol=ATOL[dtype])


def test_compiled_decode_attention_refuses_a_position_beyond_the_cache():
    from engine.native import append_attend_op

    q, k_new, v_new, k_caches, v_caches = _decode_batch(torch.float32, [3, 64])
    before = [t.clone() for t in k_caches]
    with pytest.raises(RuntimeError, match="position beyond the cache"):
        append_attend_op()(q, k_new, v_new, k_caches, v_caches, [3, 64], 0, torch.empty(2, 6, 16))
    assert all(torch.equal(a, b) for a, b in zip(k_caches, before))  # checked before anything is written


def _needs_bf16_kernel():
    from engine import device, native

    if "avx512_bf16" not in device.cpu_bf16_flags():
        pytest.skip("the bf16 blend kernel needs a CPU with AVX512-BF16")
    op = native.blend_attend_op()
    assert op is not None, "the CPU has AVX512-BF16 but the compiled blend kernel did not build"
    return op


@pytest.mark.parametrize("count", [1, 5, 23, 67])
def test_compiled_bf16_blend_attention_matches_brute_force(monkeypatch, count):
    """Selected rows through causal_attention take the compiled kernel (head dim 64, bf16) and
    match the reference: partial key tiles, a short register block, position 0 and N - 1."""
    op = _needs_bf16_kernel()
    calls = []
    monkeypatch.setattr(attention.native, "blend_attend_op", lambda: lambda *a: (calls.append(1), op(*a)))
    g = torch.Generator().manual_seed(6)
    N, D = 300, 64
    inner = torch.randperm(N - 2, generator=g)[:max(count - 2, 0)] + 1
    q_pos = torch.cat([torch.tensor([0]), inner, torch.tensor([N - 1])]).sort().values if count > 1 else torch.tensor([N - 1])
    rows = torch.randn(q_pos.numel(), 6, D, generator=g).bfloat16()
    q = rows.transpose(0, 1)                                # [H, S, D], strided as the model makes it
    k, v = (torch.randn(2, N, D, generator=g).mul(2).bfloat16() for _ in range(2))
    got = causal_attention(q, k, v, CausalPlan(q_pos, N, q.dtype))
    assert calls, "causal_attention did not take the compiled kernel"
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), brute_force(q.float(), k.float(), v.float(), q_pos), atol=ATOL[torch.bfloat16])


def test_compiled_bf16_blend_attention_refuses_a_position_beyond_the_keys():
    op = _needs_bf16_kernel()
    q, k = torch.zeros(6, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 10, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="beyond the keys"):
        op(q, k, k, torch.tensor([3, 10]), torch.empty_like(q), 0.125)


def test_compiled_decode_attention_bf16_path_matches_brute_force():
    """bf16, head dim 64, on AVX512-BF16: the decode kernel's dot-product path (16 keys a step,
    keys in pairs for the weighted sum), at cache lengths around those steps."""
    _needs_bf16_kernel()
    from engine.native import append_attend_op

    positions, layer = [0, 1, 14, 15, 16, 32, 300], 2
    q, k_new, v_new, k_caches, v_caches = _decode_batch(torch.bfloat16, positions, H=9, Hkv=3, D=64, capacity=320)
    got = torch.full((len(positions), 9, 64), float("nan"), dtype=torch.bfloat16)
    append_attend_op()(q, k_new, v_new, k_caches, v_caches, positions, layer, got)
    for b, p in enumerate(positions):
        ref = brute_force(q[:, b].float()[:, None] * 8, k_caches[b][layer].float(), v_caches[b][layer].float(), torch.tensor([p]))[:, 0]
        assert torch.allclose(got[b].float(), ref, atol=ATOL[torch.bfloat16]), p
