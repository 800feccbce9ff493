"""`cacheblend inspect`: what CacheBlend selected for one request, and why.

For one prompt (a dataset record, or `--prompt-file` with {"chunks": [...], "question": ...})
it prints, per check layer, the HKVD count, share of chunk tokens and mean position, the range
of the score that ranked them (the KV deviation, or with the stored signal the stored
sensitivity) for the selected and the skipped tokens, and the TTFT breakdown; `--png` writes a
histogram of that score at each check layer with the selection threshold marked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.dataset import PREFIX, load, suffix_for
from config import add_settings_flags, load_settings
from config.settings import STORED_RANKING
from engine.llm_engine import LLMEngine
from engine.request import BlendParams
from engine.sampling import SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="HKVD selection and TTFT breakdown of one request (with a deviation histogram)")
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--record", type=int, default=0)
    p.add_argument("--passages", type=int, default=10)
    p.add_argument("--prompt-file", type=Path, default=None, help='JSON {"chunks": [str, ...], "question": str} instead of a record')
    p.add_argument("--png", type=Path, default=None, help="write the deviation histogram here")
    add_settings_flags(p, fields=["model", "device", "dtype", "recompute_ratio", "check_layers", "check_ratios",
                                  "selection_signal", "chunk_context", "recompute_chunk_head", "data_dir"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = LLMEngine(load_settings(args, chat_preamble=PREFIX, kv_disk_bytes=0))
    if args.prompt_file:
        spec = json.loads(args.prompt_file.read_text())
        texts, question = spec["chunks"], spec["question"]
    else:
        record = load(args.dataset)[args.record]
        texts, question = [p + "\n\n" for p in record.passages[: args.passages]], record.question
    chunks = [engine.chunk_from_text(t) for t in texts]
    segments = engine.chat_segments([{"role": "user", "content": suffix_for(question)}], chunks)
    stored = all(engine.ensure_chunk(c).sensitivity is not None for c in chunks)
    stats = engine.prefill(segments, BlendParams(mode="cacheblend")).result.stats
    engine.prefix_cache.clear()
    request = engine.make_request("inspect", segments, SamplingParams(max_tokens=24, temperature=0), BlendParams(mode="cacheblend"))
    answer = engine.generate([request])["inspect"]

    print(f"prompt: {stats.num_tokens} tokens, {stats.cached_tokens} chunk tokens in {len(chunks)} chunks")
    first = min(stats.selected, default=None)
    # the stored ranking orders the first check layer by the stored sensitivity, not by a deviation
    attended = request.spec.signal == "attended"
    later = "attention-weighted deviation" if attended else "deviation"
    early = "stored sensitivity x question's attention" if attended else "stored sensitivity"
    score = {layer: early if request.spec.signal in STORED_RANKING and layer == first and stored else later
             for layer in stats.selected}
    for layer, selected in stats.selected.items():
        deviation = stats.deviation[layer]
        candidates = stats.candidates[layer]
        chosen = torch.tensor([c in set(selected) for c in candidates])
        # where the recomputed rows sit: a later row attends over more keys, so it costs more
        where = f", mean position {sum(selected) / len(selected) / stats.num_tokens:.2f} of the prompt" if selected else ""
        print(f"check layer {layer}: HKVD {len(selected)} of {len(candidates)} candidates "
              f"({len(selected) / max(stats.cached_tokens, 1):.1%} of chunk tokens{where})")
        if chosen.any():
            print(f"  selected {score[layer]}  {deviation[chosen].min():.4g} .. {deviation[chosen].max():.4g}")
        if (~chosen).any():
            print(f"  skipped {score[layer]}   {deviation[~chosen].min():.4g} .. {deviation[~chosen].max():.4g}")
    st = answer["stats"]
    print("ttft {ttft_s:.3f}s = queue {queue_s:.3f} + kv fetch {kv_fetch_s:.3f} + selection {selection_s:.3f} "
          "+ recompute {recompute_s:.3f} + first decode {first_decode_s:.3f}".format(**dataclasses.asdict(st)))
    print(f"answer: {answer['text']!r}")
    if args.png:
        _histogram(stats, score, args.png)
        print(f"wrote {args.png}")
    return 0


def _histogram(stats, score: dict[int, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(stats.selected)
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 3 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        deviation = stats.deviation[layer].float()
        chosen = torch.tensor([c in set(stats.selected[layer]) for c in stats.candidates[layer]])
        bins = torch.logspace(float(deviation.clamp_min(1e-8).log10().min()), float(deviation.clamp_min(1e-8).log10().max()), 60).numpy()
        ax.hist(deviation[~chosen].clamp_min(1e-8).numpy(), bins=bins, label="reused", color="tab:blue", alpha=0.7)
        ax.hist(deviation[chosen].clamp_min(1e-8).numpy(), bins=bins, label="recomputed (HKVD)", color="tab:red", alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel(f"stored sensitivity, check layer {layer}" if score[layer] != "deviation"
                      else f"KV deviation at layer {layer} (squared L2, fresh vs cached)")
        ax.set_ylabel("tokens")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
