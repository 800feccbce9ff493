"""Decoding from the fused cache: batching, sampling, stop conditions, aborts."""

import pytest

from conftest import PASSAGES, QUESTION
from engine.request import BlendParams, RequestError
from engine.sampling import SamplingParams


def segments(engine, question=QUESTION, passages=PASSAGES[:2]):
    return engine.chat_segments([{"role": "user", "content": question}], [engine.chunk_from_text(p) for p in passages])


def run(engine, *requests):
    return engine.generate(list(requests))


def test_continuous_batching_gives_the_same_tokens_as_alone(engine):
    questions = [QUESTION, "What is Dijon famous for?", "When was the Eiffel Tower completed?"]
    reqs = [engine.make_request(f"r{i}", segments(engine, q), SamplingParams(max_tokens=8 + 3 * i, temperature=0), BlendParams(mode="cacheblend"))
            for i, q in enumerate(questions)]
    alone = {r.request_id: run(engine, r)[r.request_id]["token_ids"] for r in reqs}
    together = run(engine, *reqs)
    for r in reqs:
        assert together[r.request_id]["token_ids"] == alone[r.request_id]
        assert together[r.request_id]["finish_reason"] in ("stop", "length")


def test_requests_join_a_running_batch(engine):
    """A request added mid-decode joins the batch between steps and is unaffected by it."""
    a = engine.make_request("a", segments(engine), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    b = engine.make_request("b", segments(engine, "What is Dijon famous for?"), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    alone_b = run(engine, b)["b"]["token_ids"]
    engine.add_request(a)
    got = {"a": [], "b": []}
    steps = 0
    while engine.has_work():
        if steps == 3:
            engine.add_request(b)
        for out in engine.step():
            got[out.request_id] += out.token_ids
        steps += 1
    assert len(got["a"]) == 10
    assert got["b"] == alone_b


def test_a_stream_keeps_decoding_while_another_request_prefills(engine, monkeypatch):
    """Between the pieces of a prefill the running streams get their next token (a step's budget
    of computed tokens, here the smallest piece: MIN_PIECE_ROWS rows of a layer, so a long layer
    is split); every answer equals the one it gets alone."""
    from engine.blend import MIN_PIECE_ROWS
    from engine.steps import run_for

    monkeypatch.setattr(engine, "settings", engine.settings.model_copy(update={"max_num_batched_tokens": 1}))
    a = engine.make_request("a", segments(engine), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    b = engine.make_request("b", segments(engine, "What is Dijon famous for?", PASSAGES),
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                            BlendParams(mode="cacheblend", selection_signal="sensitivity"))  # layers 0-1: every token, in parts
    alone = {r.request_id: run(engine, r)[r.request_id]["token_ids"] for r in (a, b)}
    steps, pieces, done = engine.prefiller.steps(b.segments, b.mode, b.spec, b.num_prompt_tokens, remember=False, salt=b.salt), 0, None
    while done is None:  # one call a step, as the engine makes them
        done, _ = run_for(steps, 1)
        pieces += 1
    layer0 = done.result.stats.computed_per_layer[0]
    assert layer0 > MIN_PIECE_ROWS and pieces > engine.model.cfg.num_layers  # its first layers come in parts
    engine.add_request(a)
    first = engine.step()
    assert [o.request_id for o in first] == ["a"]  # nobody decoding: the prefill runs to its end
    engine.add_request(b)
    got, a_during_b = {"a": list(first[0].token_ids), "b": []}, 0
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.token_ids
            a_during_b += out.request_id == "a" and not got["b"]
    assert a_during_b == pieces  # beside each piece of b's prefill, and the step that ends it (its logits)
    assert got == alone


def test_ratio_one_under_load_answers_as_full_prefill_alone(engine, monkeypatch):
    """Blends at ratio 1.0 that arrive together, split into pieces between the decode steps of
    the others, each answer exactly as its full prefill run alone."""
    monkeypatch.setattr(engine, "settings", engine.settings.model_copy(update={"max_num_batched_tokens": 512}))
    questions = [QUESTION, "What is Dijon famous for?", "When was the Eiffel Tower completed?"]

    def requests(mode: str, ratio: float | None) -> list:
        return [engine.make_request(f"{mode}{i}", segments(engine, q, PASSAGES[i % 2:i % 2 + 2]),
                                    SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), BlendParams(mode=mode, recompute_ratio=ratio))
                for i, q in enumerate(questions)]

    alone = [run(engine, r)[r.request_id]["token_ids"] for r in requests("full_prefill", None)]
    together = run(engine, *requests("cacheblend", 1.0))
    assert [together[f"cacheblend{i}"]["token_ids"] for i in range(len(questions))] == alone


def test_max_itl_slowdown_splits_a_prefill_the_token_budget_would_not(engine, monkeypatch):
    """With no token budget to speak of, the time policy alone sizes the pieces: the first two
    PROBE_ROWS (a computed token's cost is not known yet), the next so a step lasts about
    `max_itl_slowdown` decode steps. Without it the prefill runs whole beside one decode step."""
    from collections import deque

    from engine.llm_engine import ROW_COST_PIECES

    a = engine.make_request("a", segments(engine), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    b = engine.make_request("b", segments(engine, "What is Dijon famous for?", PASSAGES),
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), BlendParams(mode="cacheblend"))
    alone = {r.request_id: run(engine, r)[r.request_id]["token_ids"] for r in (a, b)}
    a_during_b = {}
    for slowdown in (0.0, 3.0):
        monkeypatch.setattr(engine, "settings", engine.settings.model_copy(
            update={"max_num_batched_tokens": 1 << 30, "max_itl_slowdown": slowdown}))
        monkeypatch.setattr(engine, "_row_costs", deque(maxlen=ROW_COST_PIECES))  # nothing measured yet
        engine.add_request(a)
        got, a_during_b[slowdown] = {"a": list(engine.step()[0].token_ids), "b": []}, 0
        engine.add_request(b)
        while engine.has_work():
            for out in engine.step():
                got[out.request_id] += out.token_ids
                a_during_b[slowdown] += out.request_id == "a" and not got["b"]
        assert got == alone
    assert a_during_b[0.0] == 1          # one decode step, then b's whole prefill
    assert a_during_b[3.0] >= 3          # two probe pieces at least, then measured ones


def test_max_tokens_finishes_with_length(engine):
    r = engine.make_request("len", segments(engine), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    out = run(engine, r)["len"]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3
    assert out["stats"].completion_tokens == 3


def test_stop_string_truncates_and_finishes(engine):
    base = run(engine, engine.make_request("s0", segments(engine), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))["s0"]["text"]
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    out = run(engine, engine.make_request("s1", segments(engine), SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)))["s1"]
    assert out["finish_reason"] == "stop"
    assert stop not in out["text"]
    assert base.startswith(out["text"])


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(engine):
    def sample(seed):
        r = engine.make_request(f"seed{seed}", segments(engine), SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=seed, ignore_eos=True))
        return run(engine, r)[r.request_id]["token_ids"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_one_is_greedy(engine):
    greedy = run(engine, engine.make_request("g", segments(engine), SamplingParams(max_tokens=6, temperature=0)))["g"]["token_ids"]
    topk1 = run(engine, engine.make_request("k", segments(engine), SamplingParams(max_tokens=6, temperature=0.8, top_k=1, seed=3)))["k"]["token_ids"]
    assert topk1 == greedy


def test_abort_removes_a_running_request(engine):
    r = engine.make_request("ab", segments(engine), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request(r)
    outs = engine.step()  # prefill + first token
    assert outs[0].token_ids and engine.scheduler.num_running == 1
    engine.abort("ab")
    final = engine.step()
    assert final[0].finished and final[0].finish_reason == "abort"
    assert engine.scheduler.num_running == 0 and not engine.has_work()


def test_stats_report_ttft_and_phases(engine):
    out = run(engine, engine.make_request("st", segments(engine), SamplingParams(max_tokens=2, temperature=0), BlendParams(mode="cacheblend", recompute_ratio=0.2)))["st"]
    st = out["stats"]
    for name in ("queue_s", "kv_fetch_s", "selection_s", "recompute_s", "first_decode_s", "ttft_s", "e2e_s"):
        assert getattr(st, name) >= 0
    assert st.ttft_s >= st.recompute_s
    assert st.tokens_reused + st.tokens_recomputed == st.prompt_tokens
    assert st.mode == "cacheblend" and st.ratio == 0.2


def test_bad_requests_are_rejected_and_engine_keeps_serving(engine):
    with pytest.raises(RequestError) as e:
        engine.make_request("big", segments(engine), SamplingParams(max_tokens=engine.max_model_len))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError):
        engine.make_request("mode", segments(engine), blend=BlendParams(mode="turbo"))
    with pytest.raises(RequestError):
        engine.make_request("layers", segments(engine), blend=BlendParams(mode="cacheblend", check_layers=[99]))
    ok = run(engine, engine.make_request("ok", segments(engine), SamplingParams(max_tokens=2, temperature=0)))["ok"]
    assert ok["finish_reason"] in ("stop", "length") and ok["token_ids"]


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-6])
def test_a_tiny_temperature_is_greedy_and_fails_no_one(engine, temperature):
    greedy = run(engine, engine.make_request("g", segments(engine), SamplingParams(max_tokens=4, temperature=0)))["g"]
    tiny = engine.make_request("tiny", segments(engine), SamplingParams(max_tokens=4, temperature=temperature, seed=1))
    other = engine.make_request("other", segments(engine, "What is Dijon famous for?"), SamplingParams(max_tokens=4, temperature=0))
    out = run(engine, tiny, other)
    assert out["tiny"]["token_ids"] == greedy["token_ids"] and out["tiny"]["finish_reason"] in ("stop", "length")
    assert out["other"]["finish_reason"] in ("stop", "length")


def test_a_request_resolved_at_submit_keeps_its_spec(engine):
    """The spec is frozen on the request: a later change of the server's ratio does not touch it."""
    r = engine.make_request("frozen", segments(engine), SamplingParams(max_tokens=1, temperature=0), BlendParams(mode="cacheblend"))
    from engine.selection import funnel_schedule

    schedule = funnel_schedule(engine.recompute_ratio, engine.model.cfg.num_layers)
    assert r.mode == "cacheblend" and (r.spec.check_layers, r.spec.ratios) == schedule and r.sampling.max_tokens == 1
    assert r.spec.ratio == engine.recompute_ratio
    unbounded = engine.make_request("u", segments(engine), SamplingParams(max_tokens=None))
    assert unbounded.sampling.max_tokens == engine.max_model_len - unbounded.num_prompt_tokens


def test_a_message_quoting_the_internal_sentinel_is_ordinary_text(engine):
    from engine.prompt import _SENTINEL

    quoted = f"Never say {_SENTINEL}."
    segs = engine.chat_segments([{"role": "system", "content": quoted}, {"role": "user", "content": "Hi"}],
                                [engine.chunk_from_text(PASSAGES[0])])
    text = engine.tokenizer.decode([t for s in segs for t in s.token_ids])
    assert quoted in text and text.index(quoted) < text.index("Eiffel") < text.index("Hi")
