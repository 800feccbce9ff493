"""`cacheblend bench gpu --vllm`: the vLLM backend on a GPU, in one call: `bench vllm-backend`
(vLLM alone, with its prefix caching, with the CacheBlend connector, and the native engine, on
the same token IDs) on a model with random weights in Mistral-7B's shape.

vLLM loads its model from disk, so the random weights (`gpu_model.random_state_dict`, built on
the device) are written once as a Llama model directory, with the embedded model's tokenizer
(its vocabulary sets the embedding size, so MuSiQue prompts are valid token IDs there). Random
weights give meaningless text but the real arithmetic. Needs vLLM's CUDA wheel
(`pip install -e .[vllm-cuda]`). `--dry-run`: a tiny 2-layer model on the CPU with vLLM's CPU
wheel, one question of 2 passages (what the test runs).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from bench.dataset import DEFAULT_DATASET
from bench.gpu_model import MISTRAL_7B, random_state_dict

# vLLM's CPU attention needs a head size it has kernels for (64 is one)
TINY_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template*")


def write_model_dir(target: Path, shape: dict, device: torch.device, dtype: torch.dtype, seed: int,
                    tokenizer_dir: Path, max_positions: int = 32768) -> Path:
    """A Llama model directory: `shape` with random weights, the tokenizer of `tokenizer_dir`."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    shape = {**shape, "vocab_size": vocab}
    target.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, max_position_embeddings=max_positions, rope_theta=1e6, tie_word_embeddings=False,
                         torch_dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"])
    config.save_pretrained(target)
    weights = {k: v.cpu().contiguous() for k, v in random_state_dict(shape, device, dtype, seed).items()}
    save_file(weights, str(target / "model.safetensors"))
    for pattern in TOKENIZER_FILES:
        for path in tokenizer_dir.glob(pattern):
            shutil.copy(path, target / path.name)
    return target


def run_vllm(args: argparse.Namespace) -> int:
    from bench import vllm_backend
    from config.settings import Settings
    from engine.loader import convert_embedded

    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    dtype_name = args.dtype or ("float32" if args.dry_run else "bfloat16")
    shape = TINY_LLAMA if args.dry_run else MISTRAL_7B
    settings = Settings()
    model_dir = args.out.parent / ("gpu-vllm-tiny" if args.dry_run else "gpu-vllm-mistral-7b-shape")
    write_model_dir(model_dir, shape, device, getattr(torch, dtype_name), args.seed, convert_embedded(settings.data_dir))
    print(f"random {shape['num_hidden_layers']}-layer model written to {model_dir}", flush=True)
    bench_args = argparse.Namespace(
        dataset=DEFAULT_DATASET, questions=(0, 0) if args.dry_run else (0, 2), passages=2 if args.dry_run else 10,
        ratio=args.ratio, repeat=1 if args.dry_run else 2, compile=not args.dry_run, json=args.out.with_suffix(".vllm.json"),
        model=str(model_dir), dtype=dtype_name, data_dir=None, device="cpu" if args.dry_run else "cuda",
        gpu_memory_utilization=None if args.dry_run else 0.6)  # the native engine holds a copy of the model too
    return vllm_backend.run(bench_args)
