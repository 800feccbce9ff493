"""`cacheblend eval`: answer quality and TTFT of every prefill mode on MuSiQue, side by side.

For each question the prompt is laid out as in ../shared/data/README.md (see bench/dataset.py),
rendered through the model's chat template, and its chunk KV is precomputed first (not timed).
Then every mode answers it greedily: `full_prefill` (the reference), `prefix_cache`, `full_reuse`
and `cacheblend` at each `--ratios` value, plus the `--variants` (configuration variants of
cacheblend). The order of the modes is rotated from one question to the next so that machine
noise is spread over all of them.

Per mode the table (and JSON row) gives: F1 against the gold answers; agreement with
full_prefill's answer (token F1, exact-match share); the KL divergence KL(full_prefill || mode)
of the first-token distribution (last-token logits); the share of questions where that KL is
below full_reuse's; top-1 agreement of the first token; TTFT median and p95; tokens recomputed.
A second table gives the mean and a 95% bootstrap interval (fixed seed) of the KL ratio to
full_reuse and of the agreement metrics. The JSON holds every question's metrics per mode
(`questions[].results`), so any table can be recomputed from it.

Questions (the protocol in BENCHMARKS.md): `--questions 0-49` is the dev split, `--questions
50-129` the report split; questions 130-149 are reserved and refused without `--allow-reserved`.

Prefix cache and TTFT: see bench/eval_harness.py (every mode starts with a cold prefix cache
except `prefix_cache`, or all reuse modes with `--warm-prefix`; TTFT is prefill + first token).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Optional

import torch

from bench import dataset as ds
from bench.eval_context import context_scaling, format_context
from bench.eval_harness import Harness, eval_settings, evaluate
from bench.eval_metrics import summarize
from bench.eval_report import fmt, format_intervals, format_table, format_variants
from bench.eval_variants import VARIANT_HELP, Plan, make_plan, parse_variants
from config import MODES, add_settings_flags
from engine.request import BlendParams
from engine.resolve import resolve_blend

DEFAULT_RATIOS = "0.05,0.1,0.15,0.2,0.3,1.0"
SETTINGS_FLAGS = ["model", "device", "dtype", "data_dir", "max_model_len", "check_layers", "check_ratios",
                  "selection_signal", "sensitivity_pool", "chunk_context", "recompute_chunk_head", "kv_storage_dtype"]


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text and text.strip() != "none" else []


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text and text.strip() != "none" else []


def question_range(text: str) -> tuple[int, int]:
    try:
        return ds.parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_question_args(p: argparse.ArgumentParser, limit: Optional[int]) -> None:
    """Which questions: a range or a start, then a count (shared by eval, tune and the selection study)."""
    p.add_argument("--dataset", type=Path, default=ds.DEFAULT_DATASET, help="musique_s.json (default: %(default)s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--questions", type=question_range, default=None, metavar="A-B",
                       help="question indices A to B, both included: 0-49 is the dev split, 50-129 the report split")
    where.add_argument("--start", type=int, default=0, help="first question index (default: %(default)s)")
    p.add_argument("--limit", type=int, default=limit,
                   help="questions to use, from the start of the range (default: %(default)s; none = the whole range)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch and, with --shuffle, which questions are drawn")
    p.add_argument("--shuffle", action="store_true", help="draw --limit questions of the range at random (with --seed)")
    p.add_argument("--allow-reserved", action="store_true",
                   help=f"run reserved questions {ds.RESERVED.start}-{ds.RESERVED.stop - 1} (the protocol says never)")


def select_records(args: argparse.Namespace) -> list[ds.Record]:
    first, last = args.questions if args.questions else (args.start, None)
    try:
        return ds.select_questions(ds.load(args.dataset), first, last, args.limit, args.seed, args.shuffle,
                                   args.allow_reserved)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def add_common_args(p: argparse.ArgumentParser, limit: Optional[int]) -> None:
    """Flags shared by eval and tune."""
    add_question_args(p, limit)
    p.add_argument("--passages", type=int, default=None, help="passages per question (default: all, 10 in musique_s)")
    p.add_argument("--passage-chars", type=int, default=None,
                   help="cut every passage to this many characters (quick smoke runs; default: whole passages)")
    p.add_argument("--warm-prefix", action="store_true", help="also give full_reuse and cacheblend the warm instruction prefix")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_settings_flags(p, fields=SETTINGS_FLAGS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="answer quality and TTFT of every prefill mode on MuSiQue",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, limit=None)
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="cacheblend recompute ratios (default: %(default)s)")
    p.add_argument("--modes", default="prefix_cache,full_reuse",
                   help="baseline modes besides full_prefill (always run) (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length cap (default: %(default)s)")
    p.add_argument("--variants", default=None, help=f"comma list of cacheblend variants to run side by side: {VARIANT_HELP}")
    p.add_argument("--variant-ratios", "--variant-ratio", dest="variant_ratios", default="0.15",
                   help="recompute ratios of the variants, each run at every one (default: %(default)s)")
    p.add_argument("--context-points", default="2,4,6,8,10",
                   help="passage counts for the TTFT-vs-context plot; 'none' skips it (default: %(default)s)")
    p.add_argument("--context-questions", type=int, default=3, help="questions per context point (default: %(default)s)")
    p.add_argument("--context-repeat", type=int, default=1, help="repeats per context point and question (default: %(default)s)")
    p.add_argument("--context-ratio", type=float, default=0.15, help="cacheblend ratio in the context sweep (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None,
                   help="write config, rows, variants, context rows and per-question results here (also after every question)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run whose --json file exists: its questions are kept, the others run")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.set_defaults(func=run)


def setup(args: argparse.Namespace) -> tuple[Harness, list[ds.Record]]:
    logging.basicConfig(level=logging.WARNING)
    records = [ds.truncate(r, args.passage_chars) for r in select_records(args)]
    if not records:
        raise SystemExit("no questions selected")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return Harness(eval_settings(args)), records


def config_of(args: argparse.Namespace, harness: Harness) -> dict:
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    s = harness.settings
    num_layers = harness.default.model.cfg.num_layers
    schedules = {}
    for r in parse_floats(args.ratios):  # what each cacheblend@r row ran: the signal's schedule, unless set
        spec = resolve_blend(BlendParams(mode="cacheblend", recompute_ratio=r), s, num_layers, r)[1]
        schedules[f"{r:g}"] = {"check_layers": list(spec.check_layers), "check_ratios": list(spec.ratios)}
    cfg.update({"model_name": harness.default.model_name, "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__, "check_layers": s.check_layers, "check_ratios": s.check_ratios,
                "schedules": schedules,
                "selection_signal": s.selection_signal, "chunk_context": s.chunk_context,
                "recompute_chunk_head": s.recompute_chunk_head, "kv_storage_dtype": s.kv_storage_dtype,
                "device": str(harness.default.device), "dtype": str(harness.default.model.dtype)})
    return cfg


def run_plan(harness: Harness, records: list[ds.Record], plan: Plan, args: argparse.Namespace,
             done: list[dict] = (), on_question=None) -> tuple[list[dict], list[dict], list[dict]]:
    """Every spec of `plan` on every record, as the common flags say: (rows, variant rows, per-question rows)."""
    res = evaluate(harness, records, plan.specs, num_passages=args.passages, max_new_tokens=args.max_new_tokens,
                   warm=args.warm_prefix, progress=not args.no_progress, done=done, on_question=on_question)
    rows, var_rows = summarize(plan, res["per_spec"])
    return rows, var_rows, res["questions"]


RUN_ONLY = {"resume", "json", "plots", "no_progress", "threads", "torch_threads"}  # may differ on resume


def earlier_run(args: argparse.Namespace, config: dict) -> tuple[list[dict], float]:
    """(question rows, elapsed seconds) of the run `--resume` continues: the same configuration
    but for RUN_ONLY keys; nothing without --resume."""
    if not args.resume:
        return [], 0.0
    if args.json is None or not args.json.is_file():
        raise SystemExit("--resume continues the run in --json FILE; give an existing file")
    earlier = json.loads(args.json.read_text())
    config = json.loads(json.dumps(config, default=str))  # as the file holds it (tuples as lists, paths as text)
    differ = sorted(k for k in set(config) | set(earlier["config"])
                    if k not in RUN_ONLY and config.get(k) != earlier["config"].get(k))
    if differ:
        raise SystemExit(f"--resume: {args.json} was run with other settings: {', '.join(differ)}")
    return earlier["questions"], earlier.get("elapsed_s", 0.0)


def write_json(path: Path, out: dict) -> None:
    """Atomically: an interrupted run leaves the last complete file, never half of one."""
    from kvstore.atomic import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out, indent=2, default=str).encode())


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES or m == "cacheblend"]
    if bad:
        raise SystemExit(f"--modes takes prefix_cache,full_reuse (full_prefill always runs); got {bad}")
    harness, records = setup(args)
    try:
        variants = parse_variants(args.variants, harness.default.model.cfg.num_layers)
        plan = make_plan(harness, modes, parse_floats(args.ratios), variants, parse_floats(args.variant_ratios))
        config = config_of(args, harness)
        done, elapsed_before = earlier_run(args, config)
        t0 = time.perf_counter()

        def checkpoint(questions: list[dict]) -> None:
            if args.json:
                write_json(args.json, {"config": config, "partial": True, "questions": questions,
                                       "elapsed_s": elapsed_before + time.perf_counter() - t0})

        rows, var_rows, questions = run_plan(harness, records, plan, args, done, checkpoint)
        points = [p for p in parse_ints(args.context_points) if p <= max(len(r.passages) for r in records)]
        ctx_rows = context_scaling(harness, records[: args.context_questions], points, args.context_ratio,
                                   args.context_repeat, args.warm_prefix, progress=not args.no_progress) if points else []
        elapsed = elapsed_before + time.perf_counter() - t0
        print(f"{len(records)} questions ({records[0].index}..{records[-1].index}), "
              f"{fmt(rows[0]['prompt_tokens'], '.0f')} prompt tokens on average, "
              f"{harness.default.model_name} on {harness.default.device}, {torch.get_num_threads()} threads, {elapsed:.0f} s")
        print(format_table(rows))
        if var_rows:
            print("\nvariants (cacheblend; KL<reuse: share of questions with KL below default full_reuse's; "
                  "KL<own: below the full_reuse of the variant's own engine)")
            print(format_variants(var_rows))
        print("\n" + format_intervals(rows + var_rows))
        if ctx_rows:
            print("\nTTFT median (s) vs context")
            print(format_context(ctx_rows))
        if args.json:
            write_json(args.json, {"config": config, "rows": rows, "variants": var_rows, "context": ctx_rows,
                                   "questions": questions, "elapsed_s": elapsed})
        if args.plots:
            from bench import plots
            written = plots.eval_plots(rows, ctx_rows, var_rows, args.plots, harness.settings.selection_signal)
            print("plots: " + ", ".join(str(p) for p in written))
    finally:
        harness.close()
    return 0
