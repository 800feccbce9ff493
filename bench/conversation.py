"""`cacheblend bench conversation`: TTFT of each turn of a windowed conversation, per variant.

The workload is a RAG chat: turn t asks question t (dev split) with `--passages` of its
MuSiQue passages as chunks (registered beforehand, as a deployment would), or pasted into the
message (`--paste`: then the history is all there is to reuse). The client keeps the system
message and only its last `--window` earlier turns (questions and answers; earlier passages
dropped), so from turn `window + 2` on the history is no longer a prefix of anything cached. Each variant is its own engine (own store and prefix
cache, one shared model) and holds its own conversation (its own answers, `--max-tokens`).
Variants run turn by turn, interleaved, so machine noise hits them alike:
- full_prefill; prefix_cache (what vLLM's prefix caching gives);
- cacheblend_no_turns (turn reuse off: only the exact prefix is reused here);
- cacheblend and full_reuse with turn reuse (the latter recomputes nothing: the quality floor).
First-token KL is measured against a full prefill of the same prompt (untimed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.dataset import load, parse_range, select_questions
from config import add_settings_flags, load_settings
from engine.llm_engine import LLMEngine
from engine.quality import first_token_kl
from engine.request import BlendParams
from engine.sampling import SamplingParams

SYSTEM = "You are a helpful assistant. Answer each question from the passages, in a few words."
# name -> (mode, turn reuse)
VARIANTS = {"full_prefill": ("full_prefill", False), "prefix_cache": ("prefix_cache", False),
            "cacheblend_no_turns": ("cacheblend", False), "cacheblend": ("cacheblend", True),
            "full_reuse": ("full_reuse", True)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conversation", help="TTFT per turn of a windowed conversation: turn blending vs prefix caching")
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--questions", default="0-7", help="dev-split questions, one per turn (A-B)")
    p.add_argument("--window", type=int, default=2, help="earlier turns the client keeps (2: the last 3 turns with the new one)")
    p.add_argument("--passages", type=int, default=4, help="passages per turn")
    p.add_argument("--paste", action="store_true", help="paste the passages into the user message instead of chunks")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    add_settings_flags(p, fields=["model", "device", "dtype", "selection_signal", "data_dir"])
    p.set_defaults(func=run)


@dataclass
class Chat:
    """One variant's engine and conversation."""
    name: str
    engine: LLMEngine
    mode: str
    history: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def turn(chat: Chat, index: int, record, args: argparse.Namespace) -> None:
    """One timed turn, then its (untimed) first-token KL against a full prefill of the same prompt."""
    eng = chat.engine
    passages = [p + "\n\n" for p in record.passages[:args.passages]]
    content = "".join(passages) + record.question if args.paste else record.question
    chunks = [] if args.paste else [eng.chunk_from_text(p) for p in passages]
    for chunk in chunks:
        eng.ensure_chunk(chunk)  # registered beforehand (not timed)
    messages = [{"role": "system", "content": SYSTEM}] + chat.history[-2 * args.window:] + [{"role": "user", "content": content}]
    segments = eng.chat_segments(messages, chunks)
    ratio, max_tokens = args.ratio, args.max_tokens
    blend = BlendParams(mode=chat.mode, recompute_ratio=ratio if chat.mode == "cacheblend" else None)
    request = eng.make_request(f"{chat.name}-{index}", segments, SamplingParams(max_tokens=max_tokens, temperature=0),
                               blend, user_turn=eng.user_turn(messages))
    out = eng.generate([request])[request.request_id]
    st = out["stats"]
    kl = top1 = None
    if chat.mode in ("cacheblend", "full_reuse"):
        reference = eng.prefill(segments, BlendParams(mode="full_prefill"), remember=False).result.logits
        served = eng.prefill(segments, blend, remember=False).result.logits
        kl, top1 = first_token_kl(reference, served), bool(reference.argmax() == served.argmax())
    ids = out["token_ids"][:-1] if out["finish_reason"] == "stop" else out["token_ids"]
    chat.history += [messages[-1], {"role": "assistant", "content": eng.tokenizer.decode(ids)}]
    chat.rows.append({"variant": chat.name, "turn": index + 1, "prompt_tokens": st.prompt_tokens, "ttft_s": st.ttft_s,
                      "exact_tokens": st.exact_tokens, "turn_tokens": st.turn_tokens, "chunk_tokens": st.chunk_tokens,
                      "tokens_recomputed": st.tokens_recomputed, "kl": kl, "top1_agree": top1})


def run(args: argparse.Namespace) -> int:
    first, last = parse_range(args.questions)
    records = select_questions(load(args.dataset), first, last)
    base = LLMEngine(load_settings(args, kv_disk_bytes=0))
    chats = []
    for name in [v for v in args.variants.split(",") if v]:
        mode, turns = VARIANTS[name]
        eng = LLMEngine(load_settings(args, kv_disk_bytes=0, turn_reuse=turns), model=base.model, tokenizer=base.tokenizer)
        chats.append(Chat(name, eng, mode))
    warm = chats[0].engine  # allocator and rope tables, once for the shared model
    warm.generate([warm.make_request("warm", warm.chat_segments([{"role": "user", "content": "Hi"}], []),
                                     SamplingParams(max_tokens=2, temperature=0))])
    for i, record in enumerate(records):
        for chat in chats:
            turn(chat, i, record, args)
    rows = [r for chat in chats for r in chat.rows]
    _print(rows, chats, args.window)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "summary": summary(rows, args.window)}, indent=2))
    return 0


def summary(rows: list[dict], window: int) -> dict:
    """From the first turn whose history has slid (window + 2) on: TTFT ratios and mean KLs."""
    late = [r for r in rows if r["turn"] >= window + 2]
    by = {v: [r for r in late if r["variant"] == v] for v in {r["variant"] for r in rows}}
    ttft = {v: statistics.mean(r["ttft_s"] for r in rs) for v, rs in by.items() if rs}
    out = {"from_turn": window + 2, "ttft_mean_s": ttft,
           "kl_mean": {v: statistics.mean(r["kl"] for r in rs) for v, rs in by.items() if rs and rs[0]["kl"] is not None},
           "top1_agreement": {v: statistics.mean(r["top1_agree"] for r in rs) for v, rs in by.items()
                              if rs and rs[0]["top1_agree"] is not None}}
    if "cacheblend" in ttft:
        out["ttft_ratio_vs_cacheblend"] = {v: t / ttft["cacheblend"] for v, t in ttft.items()}
    if {"cacheblend", "full_reuse"} <= set(out["kl_mean"]):
        out["kl_cacheblend_over_full_reuse"] = out["kl_mean"]["cacheblend"] / max(out["kl_mean"]["full_reuse"], 1e-12)
    return out


def _print(rows: list[dict], chats: list[Chat], window: int) -> None:
    names = [c.name for c in chats]
    print("TTFT (s) per turn; [prompt tokens / turn tokens reused / exact tokens]")
    print(f"{'turn':>4} " + " ".join(f"{n:>24}" for n in names))
    for t in sorted({r["turn"] for r in rows}):
        cells = []
        for n in names:
            r = next(r for r in rows if r["variant"] == n and r["turn"] == t)
            cells.append(f"{r['ttft_s']:7.3f} [{r['prompt_tokens']}/{r['turn_tokens']}/{r['exact_tokens']}]")
        print(f"{t:>4} " + " ".join(f"{c:>24}" for c in cells))
    print(json.dumps(summary(rows, window), indent=2))
