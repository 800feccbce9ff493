"""Where and in what precision the model computes: `--device` and `--dtype` resolved once.

On CPU, bf16 pays only where the cores have bf16 dot-product instructions (AVX512-BF16, AMX):
there a bf16 GEMM runs about 4x faster than fp32; elsewhere bf16 is converted in software and
runs several times slower. So `auto` takes bf16 only on such a CPU whose torch (oneDNN) runs bf16
GEMMs on them; the choice and its reason are logged once. Not by timing a GEMM at start-up: on
a busy machine one of two replicas measured 1.0x and took fp32, and replicas that share a KV
store must agree on its format (each rejected the other's chunks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        dtype = getattr(torch, name)
        log.info("compute dtype %s (set explicitly)", name)
        return dtype
    dtype, why = auto_dtype(device)
    log.info("compute dtype %s (auto: %s)", str(dtype).removeprefix("torch."), why)
    return dtype


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The faster compute dtype on `device`, and why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device with bf16 support"
        return torch.float16, "CUDA device without bf16 support"
    flags = cpu_bf16_flags()
    if not flags:
        return torch.float32, f"CPU lacks bf16 dot-product instructions ({'/'.join(BF16_CPU_FLAGS)})"
    if not onednn_bf16():
        return torch.float32, f"CPU has {'+'.join(flags)} but this torch's oneDNN runs no bf16 GEMM"
    return torch.bfloat16, f"CPU has {'+'.join(flags)}"


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 dot-product flags this CPU reports ([] where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


def onednn_bf16() -> bool:
    """Whether this torch build's oneDNN runs bf16 GEMMs on this CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
