"""The pieces `bench gpu` runs on: a Mistral-7B-shaped model with random weights built on the device,
one-tier chunk stores, a token-ID tokenizer stand-in, and a CUDA-event timer."""

from __future__ import annotations

import math
import time

import torch

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def hf_config(shape: dict, max_positions: int):
    from transformers import MistralConfig

    return MistralConfig(**shape, max_position_embeddings=max_positions, rope_theta=1e6, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@torch.no_grad()
def random_state_dict(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in HF Llama/Mistral naming, created on `device` (no CPU copy of the model)."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    D, nh, nkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    out_std = 0.02 / math.sqrt(2 * L)  # residual-branch outputs scaled down so activations stay finite

    def rnd(*size: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(size, device=device, dtype=dtype).normal_(0.0, std, generator=g)

    w = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": torch.ones(H, device=device, dtype=dtype),
         "lm_head.weight": rnd(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(H, device=device, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(H, device=device, dtype=dtype)
        w[p + "self_attn.q_proj.weight"] = rnd(nh * D, H)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * D, H)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * D, H)
        w[p + "self_attn.o_proj.weight"] = rnd(H, nh * D, std=out_std)
        w[p + "mlp.gate_proj.weight"] = rnd(I, H)
        w[p + "mlp.up_proj.weight"] = rnd(I, H)
        w[p + "mlp.down_proj.weight"] = rnd(H, I, std=out_std)
    return w


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int):
    from engine.model import Transformer

    weights = random_state_dict(shape, device, dtype, seed)
    model = Transformer(hf_config(shape, max_positions), weights, device, dtype)
    del weights
    return model


def tier_store(tier: str, device: torch.device, dtype: str):
    """A store holding chunk KV in one memory tier only, in the compute dtype.

    device: GPU memory; cpu: host memory, pinned when the device is CUDA. The engine reads it
    layer by layer (LayerPrefetcher: a background thread, side CUDA stream) during prefill.
    """
    from kvstore import TieredStore
    from kvstore.tier_memory import MemoryTier

    cap = 1 << 40  # never evict in this bench
    if tier == "device":
        t = MemoryTier("device", cap, device)
    else:
        t = MemoryTier("cpu", cap, torch.device("cpu"), pin_memory=device.type == "cuda")
    return TieredStore([t], dtype, device)


class StubTokenizer:
    """What LLMEngine reads from a tokenizer when prompts arrive as token IDs."""
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Byte-level IDs past the specials, inside even the tiny dry-run vocab (the probe passage)."""
        return [3 + b % 250 for b in text.encode()]


class Timer:
    """CUDA events on a GPU, perf_counter elsewhere; milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3
        self.wall_ms = (time.perf_counter() - self.t0) * 1e3
