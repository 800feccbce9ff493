"""Where and in what precision the model computes: `--device` and `--dtype` resolved once.

On CPU, bf16 pays only where the cores have bf16 dot-product instructions (AVX512-BF16, AMX):
there a bf16 GEMM runs about 4x faster than fp32; elsewhere bf16 is converted in software and
runs several times slower. So `auto` takes bf16 only on such a CPU, and only if a projection-sized
GEMM measured at start-up confirms it; the choice and its reason are logged once.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
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
    speedup = bf16_gemm_speedup()
    if speedup > 1.0:
        return torch.bfloat16, f"CPU has {'+'.join(flags)}; bf16 GEMM measured {speedup:.1f}x faster than fp32"
    return torch.float32, f"CPU has {'+'.join(flags)} but bf16 GEMM measured {speedup:.1f}x of fp32 speed"


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 dot-product flags this CPU reports ([] where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


@lru_cache(maxsize=1)  # measured once per process, however many engines start
def bf16_gemm_speedup(tokens: int = 1024, hidden: int = 576, out: int = 1536, repeat: int = 3) -> float:
    """fp32 time / bf16 time of one MLP-projection-sized GEMM (~0.1 s in all), best of `repeat`."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, hidden, generator=g), torch.randn(out, hidden, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16) * repeat:  # interleaved: noise hits both alike
        xd, wd = x.to(dtype), w.to(dtype)
        torch.nn.functional.linear(xd, wd)  # first-call set-up (oneDNN primitive creation)
        t = time.perf_counter()
        torch.nn.functional.linear(xd, wd)
        best[dtype] = min(best.get(dtype, float("inf")), time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]
