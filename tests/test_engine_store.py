"""The engine over the real tiered store: restart persistence and corrupt blobs never served."""

import torch

from conftest import PASSAGES, QUESTION
from engine.llm_engine import LLMEngine
from engine.request import BlendParams


def disk_only_engine(settings, tmp_path, model=None, tokenizer=None):
    s = settings.model_copy(update={"kv_cpu_bytes": 0, "kv_disk_path": tmp_path, "kv_storage_dtype": "float32"})
    return LLMEngine(s, model=model, tokenizer=tokenizer)


def prompt(eng):
    chunks = [eng.chunk_from_text(p) for p in PASSAGES]
    return chunks, eng.chat_segments([{"role": "user", "content": QUESTION}], chunks)


def blend(eng, segments):
    eng.prefix_cache.clear()
    return eng.prefill(segments, BlendParams(mode="cacheblend", recompute_ratio=0.15))


def test_chunks_survive_a_restart(engine, settings, tmp_path):
    first = disk_only_engine(settings, tmp_path, engine.model, engine.tokenizer)
    chunks, segs = prompt(first)
    cold = blend(first, segs)
    assert cold.chunk_misses == len(chunks)
    first.store.close()
    second = disk_only_engine(settings, tmp_path, engine.model, engine.tokenizer)  # a restarted server
    warm = blend(second, segs)
    assert warm.chunk_misses == 0 and warm.chunk_tiers == {"disk": len(chunks)}
    assert torch.allclose(warm.result.logits, cold.result.logits, atol=1e-4)
    second.store.close()


def test_corrupt_blob_is_recomputed_not_served(engine, settings, tmp_path):
    eng = disk_only_engine(settings, tmp_path, engine.model, engine.tokenizer)
    chunks, segs = prompt(eng)
    reference = blend(eng, segs)
    eng.store.flush()
    victim = next(tmp_path.rglob(chunks[1].chunk_key + ".safetensors"))
    data = bytearray(victim.read_bytes())
    for i in range(len(data) - 4096, len(data) - 4000):  # flip bytes inside the tensor data
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = blend(eng, segs)
    assert torch.allclose(again.result.logits, reference.result.logits, atol=1e-4)
    assert eng.store.stats()["disk"]["corrupt"] >= 1
    assert again.chunk_misses >= 1  # the corrupt chunk was recomputed from its tokens
    eng.store.close()
