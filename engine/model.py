"""The Llama-family transformer, run layer by layer on any subset of tokens.

Covers Llama 2/3 (incl. rope_scaling), Mistral, Qwen2 (QKV bias) and Qwen3 (q/k RMSNorm).
Weights come from a Hugging Face directory of safetensors files; the forward pass is ours so
that the blend prefill can run a layer on all tokens or only on the selected ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.rope import Rope, apply_rope, unapply_rope

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: Optional[int]

    @classmethod
    def from_hf(cls, c) -> "ModelConfig":
        if c.model_type not in SUPPORTED:
            raise ValueError(f"unsupported architecture {c.model_type!r}; supported: {sorted(SUPPORTED)}")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            model_type=c.model_type,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(c, "max_position_embeddings", 4096),
            sliding_window=getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None,
        )


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor             # [hidden]
    wqkv: torch.Tensor                  # [(H + 2 Hkv) * D, hidden]
    bqkv: Optional[torch.Tensor]        # [(H + 2 Hkv) * D] (Qwen2)
    q_norm: Optional[torch.Tensor]      # [D] (Qwen3)
    k_norm: Optional[torch.Tensor]      # [D] (Qwen3)
    wo: torch.Tensor                    # [hidden, H * D]
    mlp_norm: torch.Tensor              # [hidden]
    w_gate_up: torch.Tensor             # [2 * inter, hidden]
    w_down: torch.Tensor                # [hidden, inter]
    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> `pack_weight` copy (CPU)

    def __post_init__(self):
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            packed = pack_weight(getattr(self, name))
            if packed is not None:
                self.packed[name] = packed


# Up to this many rows (decode steps) a CPU GEMM runs on a copy of the weight in oneDNN's blocked
# layout (what vLLM's CPU backend runs): measured 2.2x faster than MKL at 8 rows and 1.2x at 1,
# but 10-15% slower at a prefill's thousands, where MKL (with the residual add fused) is kept.
FEW_ROWS = 32


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [S, in], w: [out, in] (`packed`: the same from `pack_weight`) -> [S, out]."""
    if packed is not None and x.shape[0] <= FEW_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return F.linear(x, w, b)


def add_linear(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h + x @ w.T. Not `addmm(h, x, w.t())`: at a few dozen rows (a blend's partial layers) MKL
    took 0.3 s per layer on that path here, against 0.02 s for the GEMM and a separate add."""
    return h + linear(x, w, packed=packed)


def pack_weight(w: torch.Tensor) -> Optional[torch.Tensor]:
    """w [out, in] in oneDNN's blocked layout for `linear`'s few-row path; None off CPU, and for
    bf16 where oneDNN has no bf16 kernels (CPUs without AVX512BW or AVX-NE-CONVERT)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.ops.mkldnn._reorder_linear_weight(w, 8)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class Transformer:
    """Weights plus the per-layer steps. Hidden states are flat: [S, hidden] for S tokens."""

    def __init__(self, hf_config, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.hf_config = hf_config
        self.cfg = cfg = ModelConfig.from_hf(hf_config)
        self.device, self.dtype = device, dtype

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def opt(name: str) -> Optional[torch.Tensor]:
            return w(name) if name in weights else None

        self.embed_tokens = w("model.embed_tokens.weight")  # [V, hidden]
        self.final_norm = w("model.norm.weight")
        # logits in float32 whatever the compute dtype: bf16 logits round by ~0.1 at typical
        # magnitudes, which shows in sampling and KL; one token's row costs nothing extra
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
        head = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
        self.lm_head = self.embed_tokens if tied and dtype == torch.float32 else head.to(device=device, dtype=torch.float32)  # [V, hidden]
        # a decode step's logits on the packed copy: 5.4 ms, not 8.8, at 1 row; 8.1, not 20.7, at 8 (49k x 576 here)
        self.lm_head_packed = pack_weight(self.lm_head)
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            biases = [opt(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            self.layers.append(LayerWeights(
                attn_norm=w(p + "input_layernorm.weight"),
                wqkv=torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                bqkv=torch.cat(biases) if all(b is not None for b in biases) else None,
                q_norm=opt(p + "self_attn.q_norm.weight"),
                k_norm=opt(p + "self_attn.k_norm.weight"),
                wo=w(p + "self_attn.o_proj.weight"),
                mlp_norm=w(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                w_down=w(p + "mlp.down_proj.weight"),
            ))
        self.rope = Rope(hf_config, cfg.head_dim, device)
        self.fingerprint = fingerprint(hf_config, weights)

    @classmethod
    def from_dir(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "Transformer":
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(str(path)), load_weights(path), device, dtype)

    @classmethod
    def from_hf_model(cls, hf_model, device: torch.device, dtype: torch.dtype) -> "Transformer":
        """Wrap an in-memory HF model's weights (used by tests with tiny random models)."""
        return cls(hf_model.config, dict(hf_model.state_dict()), device, dtype)

    # --- per-layer steps -------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[token_ids]  # [S, hidden]

    def qkv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [S, hidden] -> q [H, S, D], k [Hkv, S, D], v [Hkv, S, D]; q and k are pre-RoPE."""
        c, lw = self.cfg, self.layers[layer]
        heads = self._heads(layer, h)
        q, k, v = (t.transpose(0, 1) for t in heads.split([c.num_heads, c.num_kv_heads, c.num_kv_heads], 1))
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, c.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, c.rms_norm_eps)
        return q, k, v

    def qk_rotated(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`qkv` with q and k rotated by the tables `cos`, `sin` [S, D], in one pass where the
        model has no q/k norms (a decode step: its ops are a few rows each, their count is the cost)."""
        c = self.cfg
        if self.layers[layer].q_norm is not None:
            q, k, v = self.qkv(layer, h)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        heads = self._heads(layer, h)                                                       # [S, H + 2 Hkv, D]
        qk = apply_rope(heads[:, :c.num_heads + c.num_kv_heads].transpose(0, 1), cos, sin)  # [H + Hkv, S, D]
        return qk[:c.num_heads], qk[c.num_heads:], heads[:, c.num_heads + c.num_kv_heads:].transpose(0, 1)

    def _heads(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h: [S, hidden] -> the layer's q, k, v projections [S, H + 2 Hkv, D] (q heads first)."""
        c, lw = self.cfg, self.layers[layer]
        x = rms_norm(h, lw.attn_norm, c.rms_norm_eps)
        return linear(x, lw.wqkv, lw.bqkv, lw.packed.get("wqkv")).view(h.shape[0], c.num_heads + 2 * c.num_kv_heads, c.head_dim)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """x: [H, S, D] pre-RoPE at `positions` [S] -> rotated."""
        cos, sin = self.rope.cos_sin(positions, seq_len)
        return apply_rope(x, cos, sin)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """x: [H, S, D] rotated to `positions` [S] -> pre-RoPE (turn KV is stored like a chunk's)."""
        cos, sin = self.rope.cos_sin(positions, seq_len)
        return unapply_rope(x, cos, sin)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h: [S, hidden], attn: [H, S, D] -> next hidden [S, hidden] (o-proj, residual, MLP)."""
        c, lw = self.cfg, self.layers[layer]
        h = add_linear(h, attn.transpose(0, 1).reshape(h.shape[0], c.num_heads * c.head_dim), lw.wo, lw.packed.get("wo"))
        x = rms_norm(h, lw.mlp_norm, c.rms_norm_eps)
        gate, up = linear(x, lw.w_gate_up, packed=lw.packed.get("w_gate_up")).chunk(2, dim=-1)  # [S, inter] views
        # silu(gate) * up as one contiguous tensor (addmm would copy a strided one)
        return add_linear(h, F.silu(gate).mul_(up), lw.w_down, lw.packed.get("w_down"))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [S, hidden] -> [S, V], computed in float32."""
        return linear(rms_norm(h.float(), self.final_norm.float(), self.cfg.rms_norm_eps), self.lm_head, packed=self.lm_head_packed)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor from every safetensors file of a Hugging Face model directory."""
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                weights[name] = sf.get_tensor(name)
    return weights


def fingerprint(hf_config, weights: dict[str, torch.Tensor]) -> str:
    """Identity of config + weights: KV from another model must never be served.

    Hashes the config and, per tensor, its name, shape and a strided sample of its values
    (hashing all bytes of a 7B model would add seconds to every start).
    """
    # where the model was loaded from and which library wrote it say nothing about its KV
    config = {k: v for k, v in hf_config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        t = weights[name]
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
