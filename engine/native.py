"""The engine's C++ CPU kernels (csrc/), built once per machine and loaded on first use.

`append_attend_op()` returns the compiled batch decode attention (csrc/decode_attention.cpp), or
None where it cannot be built (no C++ compiler or Python headers): the caller then runs the same
step as torch ops (attention.append_attend_torch), after one warning. `blend_attend_op()` returns
the bf16 causal attention of any sorted query positions (csrc/blend_attention.cpp), or None where the module
cannot be built or the CPU lacks AVX512-BF16 (the caller then uses SDPA).

The build is keyed by the sources, the flags, torch's and Python's versions and the CPU's vector
width, so an upgrade or another CPU gets its own build. Each build runs in a directory of its
own and its library is renamed into place only when complete: builders running at once (several
servers, a killed build) never load a half-written file, and no lock can be left behind.
`make` builds it at install time (`python -m engine.native`), so no request waits for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "ops.cpp", CSRC / "decode_attention.cpp", CSRC / "blend_attention.cpp"]
HEADERS = [CSRC / "bf16_vec.h"]
# Vector flags per CPU capability (torch's own dispatch names); other CPUs get the compiler's default.
VECTOR_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def _flags() -> list[str]:
    # -ffast-math lets the compiler vectorise exp and the dot products' sums (at batch 8, 512
    # tokens: 19 -> 14 ms a step for 30 layers); scores are finite, so nothing it assumes fails
    cap = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["-O3", "-ffast-math", "-fopenmp", *(VECTOR_FLAGS.get(cap, []) if x86 else [])]


def _name(flags: list[str]) -> str:
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS))
    key.update(" ".join([*flags, torch.__version__, sys.version]).encode())
    return f"cacheblend_decode_{key.hexdigest()[:12]}"


def _cache_root() -> Path:
    """torch's own extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "cacheblend"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> Path:
    """Build the kernel if this machine has no build of it yet; return its library's path."""
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    flags = _flags()
    name = _name(flags)
    lib = _cache_root() / f"{name}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=f"{name}.build-") as tmp:
        load(name, [str(source) for source in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=tmp, verbose=False)
        os.replace(Path(tmp) / f"{name}.so", lib)  # same file system, atomic: readers see no library or a whole one
    log.info("built the CPU kernels in %.0f s: %s", time.perf_counter() - t0, lib)
    return lib


@lru_cache(maxsize=1)
def _module():
    """The built module, or None (logged once) where it cannot be built."""
    try:
        lib = build()
        return _import(lib.stem, lib)
    except Exception as e:  # no compiler, no headers, no ninja: torch ops instead, slower
        log.warning("CPU kernels unavailable (%s: %s); decode attention runs as torch ops (slower at large batches), "
                    "blend attention as SDPA", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def append_attend_op() -> Optional[Callable[..., None]]:
    """The compiled `append_attend(q, k_new, v_new, k_caches, v_caches, positions, layer, out)`, or None."""
    module = _module()
    return None if module is None else module.append_attend


@lru_cache(maxsize=1)
def blend_attend_op() -> Optional[Callable[..., None]]:
    """The compiled `blend_attend(q, k, v, q_pos, out, scale)`, or None: no module, or a CPU
    without AVX512-BF16 (the kernel's one instruction set)."""
    module = _module()
    return module.blend_attend if module is not None and module.blend_attend_supported() else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
