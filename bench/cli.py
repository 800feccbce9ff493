"""`cacheblend bench <name>`: the benchmarks, each in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib

BENCHES = ["bench.ttft", "bench.kv_tiers", "bench.load", "bench.peer", "bench.gpu_ttft", "bench.selection_study",
           "bench.attention_micro", "bench.batch_micro", "bench.conversation", "bench.doc_sweep", "bench.faults",
           "bench.stall", "bench.vllm_backend", "bench.decode_micro", "bench.kernels"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (numbers go to BENCHMARKS.md)")
    benches = p.add_subparsers(dest="bench", required=True)
    for module in BENCHES:
        importlib.import_module(module).register(benches)
