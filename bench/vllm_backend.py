"""`cacheblend bench vllm-backend`: TTFT of CacheBlend inside vLLM (the KV connector) against vLLM
alone and the native engine, on the same token IDs, in one run.

Per question (its passages reordered, as a RAG prompt recurs: every passage seen before, never in
this order), with `max_tokens=1`:
    vllm:full_prefill     vLLM, prefix cache emptied first
    vllm:prefix_caching   vLLM with prefix caching, after the original order was served
    vllm:cacheblend       vLLM with the CacheBlend connector, chunks stored
    native:full_prefill, native:cacheblend   this project's engine, same settings
One vLLM engine (the connector loaded, prefix caching on) serves every vLLM row: a request without
`kv_transfer_params` is plain vLLM (the connector claims nothing for it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.dataset import DEFAULT_DATASET, chunk_texts, load, messages_for, parse_range, select_questions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-backend", help="TTFT: CacheBlend inside vLLM vs vLLM alone vs the native engine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--questions", type=parse_range, default=(0, 2), help="question range, dev split by default (default: 0-2)")
    p.add_argument("--passages", type=int, default=10, help="passages per prompt (default: %(default)s, ~6,300 tokens)")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per row and question; the median is kept")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM with torch.compile, its fastest CPU mode (default: on; --no-compile: eager)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: vLLM's; leave room for the native engine's copy)")
    from config import add_settings_flags
    add_settings_flags(p, fields=["model", "dtype", "data_dir", "device"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.vllm_config import CONNECTOR, vllm_env
    for k, v in vllm_env().items():
        os.environ.setdefault(k, v)
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from config import load_settings
    from engine.llm_engine import LLMEngine
    from engine.loader import resolve_model_dir
    from engine.request import BlendParams
    from engine.segments import Segment, spans

    settings = load_settings(args)
    native = LLMEngine(settings)
    dtype = str(native.model.dtype).removeprefix("torch.")  # vLLM in the dtype `auto` picks for ours
    state = tempfile.mkdtemp(prefix="bench-vllm-")
    connector = KVTransferConfig(**CONNECTOR, kv_connector_extra_config={"state_dir": state})
    t0 = time.perf_counter()
    llm = LLM(model=str(resolve_model_dir(settings.model, settings.data_dir)), dtype=dtype, enforce_eager=not args.compile,
              max_model_len=8192, max_num_batched_tokens=8192, enable_prefix_caching=True, seed=0,
              kv_transfer_config=connector,
              **({"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}))
    print(f"vLLM up in {time.perf_counter() - t0:.0f}s ({'compiled' if args.compile else 'eager'}, {dtype})", flush=True)

    def vllm_ttft(ids: list[int], blend=None) -> tuple[float, int]:
        extra = {"kv_transfer_params": {"cacheblend": blend}} if blend else None
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, extra_args=extra),
                           use_tqdm=False)[0]
        return time.perf_counter() - t, out.outputs[0].token_ids[0]

    def native_ttft(segs, **blend) -> float:
        native.prefix_cache.clear()
        t = time.perf_counter()
        native.prefill(segs, BlendParams(**blend))
        return time.perf_counter() - t

    rows: dict[str, list[float]] = {}
    records = select_questions(load(args.dataset), *args.questions)
    for rec in records:
        chunks = [native.chunk_from_text(t) for t in chunk_texts(rec, args.passages)]
        orders = {"seen": chunks, "new": list(reversed(chunks))}
        prompts = {}
        for name, order in orders.items():
            segs = native.chat_segments(messages_for(rec), order)
            ids = [t for s in segs for t in s.token_ids]
            prompts[name] = (segs, ids, [list(x) for s, x in zip(segs, spans(segs)) if s.kind == "chunk"])
        segs, ids, spans_ = prompts["new"]
        blend = {"chunks": spans_, "recompute_ratio": args.ratio}
        vllm_ttft(prompts["seen"][1], {"chunks": prompts["seen"][2], "recompute_ratio": args.ratio})  # stores the chunks
        native_ttft(prompts["seen"][0], mode="cacheblend")                                            # the same, ours
        sample: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            llm.reset_prefix_cache()
            sample.setdefault("vllm:full_prefill", []).append(vllm_ttft(ids)[0])
            llm.reset_prefix_cache()
            vllm_ttft(prompts["seen"][1])  # the passages served before, in their first order
            sample.setdefault("vllm:prefix_caching", []).append(vllm_ttft(ids)[0])
            llm.reset_prefix_cache()  # not an exact hit of a previous identical blend: a new blend
            sample.setdefault(f"vllm:cacheblend@{args.ratio}", []).append(vllm_ttft(ids, blend)[0])
            sample.setdefault("native:full_prefill", []).append(native_ttft(segs, mode="full_prefill"))
            sample.setdefault(f"native:cacheblend@{args.ratio}", []).append(
                native_ttft(segs, mode="cacheblend", recompute_ratio=args.ratio))
        print(f"q{rec.index} {len(ids)} tokens: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in sample.items()), flush=True)
        for k, v in sample.items():
            rows.setdefault(k, []).append(statistics.median(v))
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med["vllm:full_prefill"]
    print(f"\n| engine:mode | TTFT median (s) | vLLM full prefill / this |\n| --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {base / v:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"median_s": med, "per_question_s": rows, "dtype": dtype,
                                         "vllm": "compiled" if args.compile else "eager"}, indent=2))
    llm.llm_engine.engine_core.shutdown()
    return 0
