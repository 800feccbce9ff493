"""The vLLM side of `cacheblend bench peer`, run by the vLLM venv's python as a file.

It imports only vllm and the standard library, reads one JSON command per line on stdin and
answers one JSON line on stdout (prefixed with MARK: vLLM logs to stdout as well).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

MARK = "@@PEER@@ "  # prefix of the worker's answer lines


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
    ap.add_argument("--max-num-seqs", type=int, default=8, help="largest decode batch")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, dtype=a.dtype, enable_prefix_caching=True, block_size=a.block_size,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_model_len, max_num_seqs=a.max_num_seqs,
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
            if cmd.get("cmd") == "decode":
                _answer(decode_time(llm, cmd["prompts"], cmd["tokens"]))
                continue
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


def decode_time(llm, prompts: list[list[int]], tokens: int) -> dict:
    """Seconds to decode `tokens` tokens for every prompt at once: a generate with 1 + tokens
    new tokens minus one with 1 (the prefill and the first token), prefix cache reset before each."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    spent = []
    for n in (1, 1 + tokens):
        llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        spent.append(time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
    return {"decode_s": spent[1] - spent[0], "prefill_s": spent[0]}


if __name__ == "__main__":
    # executed directly only by the vLLM venv's python, as the worker side of the benchmark
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("run `cacheblend bench peer`; this file runs directly only as its vLLM worker (--worker)")
    sys.exit(worker_main(sys.argv[2:]))
