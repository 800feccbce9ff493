"""The question's look-ahead on the real embedded model: full reuse's early layers, and the
question's attention to each chunk token averaged over them."""

import torch

from conftest import PASSAGES, QUESTION
from engine import lookahead
from engine.blend import KVCache, PrefillInput, PrefillStats, blend_prefill
from engine.request import BlendSpec
from engine.segments import spans, token_ids
from engine.selection import attention_mass
from engine.steps import run_to_end


def rag_input(engine) -> PrefillInput:
    chunks = [engine.chunk_from_text(p) for p in PASSAGES]
    segs = engine.chat_segments([{"role": "user", "content": QUESTION}], chunks)
    ids = torch.tensor(token_ids(segs))
    chunk_spans = [span for seg, span in zip(segs, spans(segs)) if seg.kind == "chunk"]
    kvs = [engine.ensure_chunk(seg) for seg in segs if seg.kind == "chunk"]
    forced = torch.ones(ids.numel(), dtype=torch.bool)
    for s, e in chunk_spans:
        forced[s:e] = False
    forced[-1] = True
    return PrefillInput(ids, forced, chunk_spans=chunk_spans, chunk_layer=lambda l: [(kv.keys[l], kv.values[l]) for kv in kvs])


def test_lookahead_runs_the_layers_before_the_second_check():
    assert lookahead.lookahead_layers(30) == range(8)
    assert lookahead.lookahead_layers(2) == range(1)


def test_question_reads_full_reuse_kv_and_its_mass_is_averaged_over_the_lookahead_layers(engine, monkeypatch):
    """At every look-ahead layer the question's rows see exactly full reuse's fused KV (so
    their hidden states are full reuse's too), and the mass returned is the mean of their
    attention mass over those layers."""
    model = engine.model
    inp = rag_input(engine)
    N = inp.token_ids.numel()
    reuse = blend_prefill(model, inp, BlendSpec(), KVCache.allocate(model, N)).cache
    seen = []

    def spy(q, q_pos, K, key_pos):
        seen.append((q_pos.clone(), K.clone(), attention_mass(q, q_pos, K, key_pos)))
        return seen[-1][2]

    monkeypatch.setattr(lookahead, "attention_mass", spy)
    positions = torch.arange(N)
    rows, chunk_pos = positions[inp.forced], positions[~inp.forced]
    stats = PrefillStats()
    mass, _ = run_to_end(lookahead.question_mass(model, inp, KVCache.allocate(model, N), stats, rows, chunk_pos))

    layers = lookahead.lookahead_layers(model.cfg.num_layers)
    assert len(seen) == len(layers)
    question = rows[rows > chunk_pos[-1]]
    for layer, (q_pos, K, _) in zip(layers, seen):
        assert torch.equal(q_pos, question)
        assert torch.allclose(K, reuse.k[layer, :, :N], atol=1e-4), layer
    assert torch.allclose(mass, torch.stack([m for *_, m in seen]).mean(dim=0))
    assert mass.shape == chunk_pos.shape and bool((mass >= 0).all()) and 0 < float(mass.sum()) <= 1.0
