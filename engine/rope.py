"""Rotary position embedding: frequencies (every HF `rope_type`), cos/sin tables, rotation.

Chunk K is stored before RoPE, so placing a chunk at any position is just `apply_rope` with
that position's cos/sin; scaled variants (linear, llama3, yarn, dynamic, ...) need nothing else.
"""

from __future__ import annotations

import torch


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return scaling


class Rope:
    """cos/sin tables for one model; `attention_scaling` (yarn's mscale) is folded into them."""

    def __init__(self, hf_config, head_dim: int, device: torch.device):
        params = _rope_parameters(hf_config)
        self.rope_type = params.get("rope_type", "default")
        self.hf_config = hf_config
        self.head_dim = head_dim
        self.device = device
        self.inv_freq, self.attention_scaling = self._init(seq_len=None)
        self._table_len = 0
        self._cos = self._sin = torch.empty(0)

    def _init(self, seq_len):
        if self.rope_type == "default":
            theta = _rope_parameters(self.hf_config)["rope_theta"]
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.device) / self.head_dim
            return 1.0 / theta**exps, 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, self.device, seq_len=seq_len)
        return inv_freq.float(), float(scaling)

    def cos_sin(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [S, D] for `positions` [S] in a sequence of `seq_len` tokens."""
        if self.rope_type == "dynamic":
            # NTK-aware dynamic scaling changes the frequencies with the sequence length.
            # Like HF, the original frequencies hold until the trained length is exceeded.
            trained = getattr(self.hf_config, "max_position_embeddings", seq_len)
            inv_freq, scaling = self._init(seq_len=max(seq_len, trained))
            return _table(positions, inv_freq, scaling)
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._table_len:
            self._table_len = max(need, 2 * self._table_len, 1024)
            all_pos = torch.arange(self._table_len, device=self.device)
            self._cos, self._sin = _table(all_pos, self.inv_freq, self.attention_scaling)
        return self._cos[positions], self._sin[positions]


def _table(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)                 # [S, D]
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [H, S, D]; cos, sin: [S, D] float32 -> x rotated to those positions (HF's half-split layout).

    Computed in float32 (bf16 cos/sin would blur positions far apart), on the two halves directly:
    the tables repeat their first half, so out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin.
    """
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]                 # [H, S, D/2]
    c, s = cos[..., :half], sin[..., :half]                 # [S, D/2]
    out = torch.empty(xf.shape, dtype=torch.float32, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s)
    return out.to(x.dtype)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of `apply_rope`: post-RoPE x back to pre-RoPE. The tables carry yarn's scale m
    (cos^2 + sin^2 = m^2), so: rotate by the negative angle, divide by m^2."""
    scale = (cos * cos + sin * sin)[..., : x.shape[-1] // 2].repeat(1, 2)  # [S, D]
    return (apply_rope(x.float(), cos, -sin) / scale).to(x.dtype)
