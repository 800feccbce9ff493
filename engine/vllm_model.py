"""vLLM's loaded Llama seen as this project's `Transformer`: the blend prefill
(`engine/blend.py`) runs vLLM's own layers.

Shared with vLLM: every weight and the kernels that use them (its linear layers, which on CPU
hold their weights repacked for oneDNN and no plain copy, its RMSNorm and SiLU-and-mul). Ours:
RoPE (chunk K is stored before RoPE and placed at any position by rotating it there) and the
attention over scattered positions with the exact causal mask (`engine/attention.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.model import ModelConfig, fingerprint, load_weights
from engine.rope import Rope, apply_rope


class VllmTransformer:
    """The per-layer steps of `engine.model.Transformer`, on a vLLM `LlamaForCausalLM`."""

    def __init__(self, vllm_model, hf_config, model_dir: Path):
        self.hf_config = hf_config
        self.cfg = cfg = ModelConfig.from_hf(hf_config)
        if cfg.model_type not in ("llama", "mistral"):
            raise ValueError(f"the vLLM backend blends Llama-architecture models; this one is {cfg.model_type!r}")
        self.vllm_model = vllm_model
        self.layers = vllm_model.model.layers
        self.embed_tokens = vllm_model.model.embed_tokens
        head = vllm_model.lm_head.weight
        self.device, self.dtype = head.device, head.dtype
        self.rope = Rope(hf_config, cfg.head_dim, self.device)
        self.fingerprint = fingerprint_dir(model_dir)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)  # [S, hidden]

    def qkv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [S, hidden] -> q [H, S, D], k [Hkv, S, D], v [Hkv, S, D], pre-RoPE."""
        c, lw = self.cfg, self.layers[layer]
        qkv, _ = lw.self_attn.qkv_proj(lw.input_layernorm(h))  # [S, (H + 2 Hkv) * D]
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        S = h.shape[0]
        return (q.reshape(S, c.num_heads, c.head_dim).transpose(0, 1),
                k.reshape(S, c.num_kv_heads, c.head_dim).transpose(0, 1),
                v.reshape(S, c.num_kv_heads, c.head_dim).transpose(0, 1))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        cos, sin = self.rope.cos_sin(positions, seq_len)
        return apply_rope(x, cos, sin)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h: [S, hidden], attn: [H, S, D] -> next hidden [S, hidden]."""
        c, lw = self.cfg, self.layers[layer]
        out, _ = lw.self_attn.o_proj(attn.transpose(0, 1).reshape(h.shape[0], c.num_heads * c.head_dim))
        h = h + out
        return h + lw.mlp(lw.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [S, hidden] -> [S, V] float32 (vLLM computes the served token; this is for checks)."""
        x = self.vllm_model.model.norm(h)
        return F.linear(x.float(), self.vllm_model.lm_head.weight.float())


def fingerprint_dir(model_dir: Path) -> str:
    """The native backend's fingerprint of the same weights, so both share chunk KV (vLLM keeps
    no plain copy of its linear weights on CPU, and edits its config: both are read from the files)."""
    from transformers import AutoConfig

    return fingerprint(AutoConfig.from_pretrained(str(model_dir)), load_weights(model_dir))
