"""CacheBlend prefill on the real embedded model, against full prefill as the reference."""

import math

import torch

from conftest import PASSAGES, QUESTION
from engine.quality import first_token_kl as kl
from engine.request import BlendParams
from engine.sampling import SamplingParams

LOGIT_ATOL = 1e-3  # fp32 on CPU; different attention kernels (causal vs masked blocks) reorder sums


def rag_segments(engine, passages=PASSAGES):
    chunks = [engine.chunk_from_text(p) for p in passages]
    return engine.chat_segments([{"role": "user", "content": QUESTION}], chunks)


def prefill(engine, segments, **blend):
    engine.prefix_cache.clear()
    return engine.prefill(segments, BlendParams(**blend))


def greedy(engine, segments, max_tokens=12, **blend):
    engine.prefix_cache.clear()
    req = engine.make_request("t", segments, SamplingParams(max_tokens=max_tokens, temperature=0), BlendParams(**blend))
    return engine.generate([req])["t"]


def test_ratio_one_matches_full_prefill(engine):
    segs = rag_segments(engine)
    full = prefill(engine, segs, mode="full_prefill")
    blend = prefill(engine, segs, mode="cacheblend", recompute_ratio=1.0)
    assert torch.allclose(blend.result.logits, full.result.logits, atol=LOGIT_ATOL)
    assert kl(full.result.logits, blend.result.logits) < 1e-6
    assert greedy(engine, segs, mode="cacheblend", recompute_ratio=1.0)["text"] == greedy(engine, segs, mode="full_prefill")["text"]


def test_full_reuse_differs_from_full_prefill(engine):
    """The problem CacheBlend solves is real: chunk KV without cross-attention is off."""
    segs = rag_segments(engine)
    full = prefill(engine, segs, mode="full_prefill").result.logits
    reuse = prefill(engine, segs, mode="full_reuse").result.logits
    blend = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.3).result.logits
    assert kl(full, reuse) > 1e-3
    assert kl(full, blend) < kl(full, reuse)


def test_one_chunk_after_prefix_is_exact_in_every_reuse_mode(settings):
    """With the real prefix in front at precompute, a chunk right after it has exact KV."""
    from engine.llm_engine import LLMEngine

    # float32 storage: the chunk KV is then bit-for-bit what a full prefill computes
    eng = LLMEngine(settings.model_copy(update={"chunk_context": "prefix", "kv_storage_dtype": "float32", "kv_disk_bytes": 0}))
    chunk = eng.chunk_from_text(PASSAGES[0])
    segs = eng.chat_segments([{"role": "user", "content": QUESTION}], [chunk])
    assert segs[0].token_ids == eng.prefiller.precompute.context
    full = prefill(eng, segs, mode="full_prefill").result.logits
    blend = prefill(eng, segs, mode="cacheblend", recompute_ratio=0.15).result.logits
    # prefix_cache: an earlier request with the same prefix and chunk but another question
    eng.prefix_cache.clear()
    other = eng.chat_segments([{"role": "user", "content": "Who designed it?"}], [chunk])
    eng.prefill(other, BlendParams(mode="prefix_cache"))
    cached = eng.prefill(segs, BlendParams(mode="prefix_cache"))
    assert cached.result.stats.exact_tokens == len(segs[0]) + len(chunk)
    assert torch.allclose(blend, full, atol=LOGIT_ATOL)
    assert torch.allclose(cached.result.logits, full, atol=LOGIT_ATOL)


def test_selection_counts_and_nesting(engine):
    segs = rag_segments(engine)
    n_chunk = sum(len(s) for s in segs if s.kind == "chunk")
    layers, ratios = [1, 8, 16], [0.2, 0.15, 0.1]
    res = prefill(engine, segs, mode="cacheblend", check_layers=layers, check_ratios=ratios)
    st = res.result.stats
    chunk_pos = set()
    pos = 0
    for s in segs:
        if s.kind == "chunk":
            chunk_pos.update(range(pos, pos + len(s)))
        pos += len(s)
    previous = chunk_pos
    for layer, r in zip(layers, ratios):
        sel = set(st.selected[layer])
        assert len(sel) == math.ceil(r * n_chunk)
        assert sel <= previous, "a later check layer chooses among the earlier selection"
        previous = sel
    n_forced = st.num_tokens - n_chunk
    assert st.computed_per_layer[0] == st.num_tokens
    assert st.computed_per_layer[2] == n_forced + math.ceil(0.2 * n_chunk)
    assert st.computed_per_layer[-1] == n_forced + math.ceil(0.1 * n_chunk)


def test_suffix_and_prefix_always_recomputed(engine):
    segs = rag_segments(engine)
    res = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.0)
    n_chunk = sum(len(s) for s in segs if s.kind == "chunk")
    assert res.result.stats.computed_per_layer[-1] == res.result.stats.num_tokens - n_chunk


def test_full_prefill_greedy_matches_hf_generate(engine):
    from transformers import AutoModelForCausalLM

    from engine.loader import resolve_model_dir
    from engine.segments import token_ids

    segs = rag_segments(engine, PASSAGES[:2])
    ids = torch.tensor([token_ids(segs)])
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("embedded", engine.settings.data_dir)), dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    ours = greedy(engine, segs, max_tokens=12, mode="full_prefill")
    eos = engine.eos_ids
    ref_ids = [t for t in ref.tolist()]
    ref_ids = ref_ids[: next((i + 1 for i, t in enumerate(ref_ids) if t in eos), len(ref_ids))]
    assert ours["token_ids"] == ref_ids


def test_prefix_cache_reuses_only_leading_segments(engine, fresh_prefix_cache):
    chunks = [engine.chunk_from_text(p) for p in PASSAGES]
    first = engine.chat_segments([{"role": "user", "content": QUESTION}], chunks)
    swapped = engine.chat_segments([{"role": "user", "content": QUESTION}], [chunks[0], chunks[2], chunks[1]])
    engine.prefill(first, BlendParams(mode="prefix_cache"))
    hit = engine.prefill(swapped, BlendParams(mode="prefix_cache"))
    assert hit.result.stats.exact_tokens == len(first[0]) + len(chunks[0])
    full = engine.prefill(swapped, BlendParams(mode="full_prefill"))
    assert torch.allclose(hit.result.logits, full.result.logits, atol=LOGIT_ATOL)


def test_sensitivity_signal_keeps_the_most_sensitive_of_the_value_pool(engine):
    segs = rag_segments(engine)
    chunks = [s for s in segs if s.kind == "chunk"]
    sens = torch.cat([engine.ensure_chunk(c).sensitivity for c in chunks])  # [n], chunk order
    assert sens.shape == (sum(len(c) for c in chunks),) and bool((sens >= 0).all()) and bool(sens.max() > 0)
    # naming the signal alone brings its own check layer (1), not the server's (0, for stored)
    st = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.15, selection_signal="sensitivity").result.stats
    cand = st.candidates[1]
    n = len(cand)
    pool = set(torch.topk(st.deviation[1], math.ceil(engine.settings.sensitivity_pool * n)).indices.tolist())
    kept = {cand.index(p) for p in st.selected[1]}
    assert len(kept) == math.ceil(0.15 * n) and kept <= pool
    assert min(sens[i] for i in kept) >= max(sens[i] for i in pool - kept)
    by_value = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.15, selection_signal="value").result.stats
    assert set(by_value.selected[1]) != set(st.selected[1])


def test_stored_signal_at_layer_zero_never_computes_the_tokens_it_drops(engine):
    """Check layer 0, stored signal: the chunk tokens of highest stored sensitivity are chosen
    before anything is computed, so every layer computes the same rows; at ratio 1.0 that is
    every token and the blend equals full prefill."""
    segs = rag_segments(engine)
    chunks = [s for s in segs if s.kind == "chunk"]
    sens = torch.cat([engine.ensure_chunk(c).sensitivity for c in chunks])  # [n], chunk order
    st = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.15, check_layers=[0], selection_signal="stored").result.stats
    n = st.cached_tokens
    kept = {st.candidates[0].index(p) for p in st.selected[0]}
    assert len(kept) == math.ceil(0.15 * n)
    assert set(torch.topk(sens, len(kept)).indices.tolist()) == kept
    assert st.computed_per_layer[:-1] == [st.num_tokens - n + len(kept)] * (len(st.computed_per_layer) - 1)
    full = prefill(engine, segs, mode="full_prefill").result.logits
    one = prefill(engine, segs, mode="cacheblend", recompute_ratio=1.0, check_layers=[0], selection_signal="stored").result
    assert one.stats.computed_per_layer[0] == one.stats.num_tokens
    assert torch.allclose(one.logits, full, atol=LOGIT_ATOL)


def test_default_funnel_keeps_the_most_read_sensitive_tokens_then_the_most_attended_deviations(engine):
    """The default (attended signal, no check layers set): layer 0 keeps the tokens of highest
    stored sensitivity times the root of the question's look-ahead attention, layer 8 keeps those of them
    whose fresh V deviation, weighted by the question's attention, is largest, and the two
    stages recompute no more chunk token-layers than the ratio at every layer would."""
    assert (engine.settings.selection_signal, engine.settings.check_layers) == ("attended", None)
    segs = rag_segments(engine)
    chunks = [s for s in segs if s.kind == "chunk"]
    sens = torch.cat([engine.ensure_chunk(c).sensitivity for c in chunks])  # [n], chunk order
    st = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.15).result.stats
    n, forced = st.cached_tokens, st.num_tokens - st.cached_tokens
    assert list(st.selected) == [0, 8]
    first = {st.candidates[0].index(p) for p in st.selected[0]}
    assert set(torch.topk(st.deviation[0], len(first)).indices.tolist()) == first
    # what ranked layer 0 is the stored sensitivity weighted by the root of an attention mass, not a constant
    mass = (st.deviation[0] / sens) ** 2
    assert bool((mass >= 0).all()) and float(mass.sum()) <= 1.0 and float(mass.std()) > 0.1 * float(mass.mean())
    by_sensitivity = set(torch.topk(sens, len(first)).indices.tolist())
    assert by_sensitivity != first
    plain = prefill(engine, segs, mode="cacheblend", recompute_ratio=0.15, selection_signal="stored").result.stats
    assert {plain.candidates[0].index(p) for p in plain.selected[0]} == by_sensitivity
    assert st.candidates[8] == st.selected[0] and set(st.selected[8]) < set(st.selected[0])
    kept = {st.candidates[8].index(p) for p in st.selected[8]}
    assert set(torch.topk(st.deviation[8], len(kept)).indices.tolist()) == kept
    assert st.computed_per_layer[:9] == [forced + len(first)] * 9
    assert st.computed_per_layer[9:] == [forced + len(kept)] * (len(st.computed_per_layer) - 9)
    assert len(first) * 8 + len(kept) * 21 <= math.ceil(0.15 * n) * 29 + 29


def test_sensitivity_signal_without_stored_sensitivity_falls_back_to_value(settings):
    """The stored ranking falls back to value deviation at layer 1 (stored would choose at 0,
    where a chunk token's KV cannot deviate); stored's and attended's funnels keep their second
    check at layer 8, and attended weighs the same deviations by the question's attention."""
    from engine.llm_engine import LLMEngine

    eng = LLMEngine(settings.model_copy(update={"selection_signal": "value", "kv_disk_bytes": 0}))
    segs = rag_segments(eng)
    assert all(eng.ensure_chunk(s).sensitivity is None for s in segs if s.kind == "chunk")
    value = prefill(eng, segs, mode="cacheblend").result.stats
    assert prefill(eng, segs, mode="cacheblend", selection_signal="sensitivity").result.stats.selected == value.selected
    layer0 = prefill(eng, segs, mode="cacheblend", selection_signal="stored", check_layers=[0]).result.stats
    assert layer0.selected == value.selected and list(value.selected) == [1]
    funnels = {signal: prefill(eng, segs, mode="cacheblend", selection_signal=signal).result.stats
               for signal in ("stored", "attended")}
    for funnel in funnels.values():
        assert list(funnel.selected) == [1, 8] and set(funnel.selected[8]) < set(funnel.selected[1])
    stored, attended = funnels["stored"], funnels["attended"]
    assert stored.candidates[1] == attended.candidates[1] == value.candidates[1]
    assert torch.equal(stored.deviation[1], value.deviation[1])
    mass = attended.deviation[1] / value.deviation[1].sqrt()
    assert bool((mass >= 0).all()) and float(mass.sum()) <= 1.0 and float(mass.std()) > 0.1 * float(mass.mean())


def test_run_for_stops_once_its_budget_of_computed_tokens_is_spent():
    from engine.steps import run_for

    sent = []

    def steps():
        for computed in (5, 3, 4):
            sent.append((yield computed))
        return "done"

    gen = steps()
    assert run_for(gen, 6) == (None, 8)      # at least the budget, whole pieces
    assert run_for(gen, 1) == (None, 4)      # at least one piece
    assert run_for(gen, 100) == ("done", 0)  # ends: its result
    assert sent == [1, 1, 100]               # the budget left goes in as the next piece's row limit
    assert run_for(steps(), 100) == ("done", 12)


def test_a_prefill_split_inside_its_layers_equals_the_whole(engine):
    """Driven by a small budget, a prefill computes parts of a layer (chunked prefill inside a
    layer, the check layer's projections and kept rows too) and gives the same result as whole layers."""
    from engine.blend import MIN_PIECE_ROWS
    from engine.steps import run_for

    segs = rag_segments(engine)
    for seg in (s for s in segs if s.kind == "chunk"):
        engine.ensure_chunk(seg)  # stored first: every prefill reads the same (storage-dtype) chunk KV
    # budget 150: pieces of up to 150 rows; 1: of MIN_PIECE_ROWS, so the check layer's kept rows split too
    # the sensitivity signal: its check layer projects every row first (the stored one chooses before)
    sens = {"mode": "cacheblend", "recompute_ratio": 0.15, "selection_signal": "sensitivity"}
    for blend, budget in ((sens, 150), (sens, 1),
                          ({"mode": "full_prefill"}, 150)):
        whole = prefill(engine, segs, **blend).result
        req = engine.make_request("p", segs, blend=BlendParams(**blend))
        engine.prefix_cache.clear()
        steps, spends, done = engine.prefiller.steps(segs, req.mode, req.spec, 0, remember=False), [], None
        while done is None:
            done, spent = run_for(steps, budget)
            spends.append(spent)
        N, per_layer = whole.stats.num_tokens, whole.stats.computed_per_layer
        kept_rows = sum(per_layer[layer + 1] for layer in req.spec.check_layers)  # a check layer's rows run twice: projected, then the kept ones finished
        assert per_layer[0] == N > 150 and kept_rows in ((0,) if req.spec.check_layers == () else range(MIN_PIECE_ROWS + 1, 150))
        assert max(spends) < budget + MIN_PIECE_ROWS and sum(spends) == sum(per_layer) + kept_rows
        assert done.result.stats.computed_per_layer == whole.stats.computed_per_layer
        assert done.result.stats.selected == whole.stats.selected
        assert torch.allclose(done.result.logits, whole.logits, atol=LOGIT_ATOL)
        for layer in (0, 1, 2, engine.model.cfg.num_layers - 1):
            assert torch.allclose(done.result.cache.k[layer, :, :N], whole.cache.k[layer, :, :N], atol=LOGIT_ATOL)
            assert torch.allclose(done.result.cache.v[layer, :, :N], whole.cache.v[layer, :, :N], atol=LOGIT_ATOL)


def test_the_lookahead_runs_in_pieces_of_its_own_and_a_split_default_prefill_equals_the_whole(engine):
    """The default (attended) runs its look-ahead before layer 0, one piece per look-ahead layer
    (so the decode streams it shares the engine with wait no longer than for a layer of it),
    and split by a budget it gives the same result as whole layers."""
    from engine.lookahead import lookahead_layers
    from engine.steps import run_for

    segs = rag_segments(engine)
    whole = prefill(engine, segs, mode="cacheblend").result
    req = engine.make_request("p", segs, blend=BlendParams(mode="cacheblend"))
    engine.prefix_cache.clear()
    steps, spends, done = engine.prefiller.steps(segs, req.mode, req.spec, 0, remember=False), [], None
    while done is None:
        done, spent = run_for(steps, 1)
        spends.append(spent)
    st = whole.stats
    forced, ahead = st.num_tokens - st.cached_tokens, len(lookahead_layers(engine.model.cfg.num_layers))
    assert spends[:ahead] == [forced] * ahead                      # the look-ahead: a piece per layer
    assert sum(spends) == ahead * forced + sum(st.computed_per_layer) + st.computed_per_layer[9]  # layer 8 projects, then finishes its kept rows
    assert done.result.stats.selected == st.selected
    assert torch.allclose(done.result.logits, whole.logits, atol=LOGIT_ATOL)
