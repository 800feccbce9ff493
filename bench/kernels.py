"""`cacheblend bench kernels`: the compiled CPU kernels against torch's ops, in one process.

Per MuSiQue question (`--questions`, the dev split by default) with `--passages` passages, chunk
KV precomputed: TTFT of a blend (`--ratio`) and of a full prefill, and the first-token
distribution of each, with the kernels (engine/native.py: bf16 attention on AVX512-BF16) and
without (SDPA and torch ops), interleaved so machine noise hits both alike. Prints the median
TTFTs and the mean first-token KL: kernels against SDPA (what the kernels change) and blend
against full prefill under each (what CacheBlend costs; the kernels should not move it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.dataset import PREFIX, build_segments, load, parse_range, select_questions
from config import add_settings_flags, load_settings
from engine import native
from engine.llm_engine import LLMEngine
from engine.quality import first_token_kl
from engine.request import BlendParams

BACKENDS = ("kernels", "torch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="compiled CPU kernels vs torch ops: TTFT and first-token KL", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--questions", type=parse_range, default=(0, 5), help="first-last question index (default: 0-5, dev)")
    p.add_argument("--passages", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--json", type=Path, default=None)
    add_settings_flags(p, fields=["model", "device", "dtype", "data_dir"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = LLMEngine(load_settings(args, chat_preamble=PREFIX, kv_disk_bytes=0))
    ops = {"append_attend_op": native.append_attend_op, "blend_attend_op": native.blend_attend_op}
    if ops["blend_attend_op"]() is None:
        raise SystemExit("no compiled bf16 kernel here (needs AVX512-BF16, bf16 and a C++ compiler)")

    def use(backend: str) -> None:
        for name, op in ops.items():
            setattr(native, name, op if backend == "kernels" else (lambda: None))

    ttft: dict[str, list[float]] = {}
    kls: dict[str, list[float]] = {}
    try:
        for record in select_questions(load(args.dataset), *args.questions):
            segments = build_segments(engine, record, args.passages)
            for seg in segments:
                if seg.kind == "chunk":
                    engine.ensure_chunk(seg)
            logits = {}
            for backend in BACKENDS:
                use(backend)
                for mode, ratio in (("cacheblend", args.ratio), ("full_prefill", None)):
                    engine.prefix_cache.clear()
                    t = time.perf_counter()
                    logits[backend, mode] = engine.prefill(segments, BlendParams(mode=mode, recompute_ratio=ratio)).result.logits
                    ttft.setdefault(f"{mode} {backend}", []).append(time.perf_counter() - t)
            kls.setdefault("full prefill: kernels vs torch", []).append(
                first_token_kl(logits["torch", "full_prefill"], logits["kernels", "full_prefill"]))
            for backend in BACKENDS:
                kls.setdefault(f"blend vs full prefill, {backend}", []).append(
                    first_token_kl(logits[backend, "full_prefill"], logits[backend, "cacheblend"]))
            print(f"question {record.index}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in ttft.items()), flush=True)
    finally:
        use("kernels")
    result = {"tokens_per_prompt": sum(len(s) for s in segments), "ttft_median_s": {k: statistics.median(v) for k, v in ttft.items()},
              "kl_mean": {k: statistics.mean(v) for k, v in kls.items()}, "ttft_s": ttft, "kl": kls}
    for k, v in result["ttft_median_s"].items():
        print(f"  TTFT {k:<28} {v:7.3f} s (median)")
    for k, v in result["kl_mean"].items():
        print(f"  KL   {k:<36} {v:.5f} (mean)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
