"""Conversation turns: split into segments, kept as processed, blended back at other positions."""

import pytest
import torch

from conftest import PASSAGES
from engine.blend import KVCache, PrefillInput, blend_prefill
from engine.selection import span_sensitivity
from engine.prompt import chat_segments, turn_ids
from engine.quality import first_token_kl
from engine.request import BlendParams, BlendSpec
from engine.rope import _table, apply_rope, unapply_rope
from engine.sampling import SamplingParams
from engine.segments import token_ids
from engine.turns import reply_positions, turn_kv, user_positions

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}
QUESTIONS = ["Who designed the Eiffel Tower?", "Where was he born?", "What is that city famous for?",
             "When was the tower completed?", "What else did his company build?", "Summarise the answers."]


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_unapply_rope_inverts_apply_rope(scale):
    """Also with yarn's attention scale folded into the tables."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    cos, sin = _table(torch.arange(40), inv_freq, scale)
    x = torch.randn(3, 40, 64)
    torch.testing.assert_close(unapply_rope(apply_rope(x, cos, sin), cos, sin), x)


def test_user_positions_span_the_header_and_the_suffix():
    # turn = header tail (7, 8) + suffix head (20, 21, 9)
    assert user_positions((7, 8, 20, 21, 9), header=(1, 2, 7, 8), suffix=(20, 21, 9, 5, 6)) == (2, 3)
    assert user_positions((7, 8, 20, 99), header=(1, 2, 7, 8), suffix=(20, 21, 9)) is None


def test_reply_positions_need_the_generation_prompt_and_the_fed_tokens():
    prompt, fed = [10, 11, 1, 50, 51], [30, 31]   # prompt ends with the generation prompt (1, 50, 51)
    reply = [1, 50, 51, 30, 31, 2, 198]           # + content + closing (end of turn, newline)
    assert reply_positions(reply, prompt, fed) == ([2, 3, 4, 5, 6], [2, 198])
    assert reply_positions([1, 50, 51, 30, 99, 2, 198], prompt, fed) is None  # retokenised differently
    assert reply_positions(reply + [0] * 5, prompt, fed) is None              # too much is missing


def test_a_turn_span_ranks_as_a_typical_chunk_token_by_sensitivity():
    chunk = torch.tensor([1.0, 5.0, 3.0])
    cpu = torch.device("cpu")
    assert span_sensitivity([chunk, None], [(1, 4), (5, 7)], 8, cpu).tolist() == [0, 1, 5, 3, 0, 3, 3, 0]
    assert span_sensitivity([None], [(5, 7)], 8, cpu) is None  # value deviation alone


def test_earlier_messages_become_keyed_turns_with_the_same_tokens(engine):
    tok = engine.tokenizer
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": QUESTIONS[0]}]
    chunks = [engine.chunk_from_text(PASSAGES[0])]
    plain = chat_segments(tok, messages, chunks)
    split = engine.chat_segments(messages, chunks)
    assert token_ids(split) == token_ids(plain)
    assert [s.kind for s in split] == ["prefix", "turn", "turn", "prefix", "chunk", "suffix"]
    assert split[1].token_ids == turn_ids(tok, messages[1]) and split[2].token_ids == turn_ids(tok, messages[2])
    # the same message later in another conversation: the same key
    moved = engine.chat_segments([messages[2], messages[1], {"role": "user", "content": "Again?"}], [])
    assert {moved[1].chunk_key, moved[2].chunk_key} == {split[1].chunk_key, split[2].chunk_key}
    assert split[1].chunk_key != engine.chunk_segment(split[1].token_ids).chunk_key  # turns are not chunks


def test_turn_kv_is_the_pre_rope_kv_at_its_positions(engine):
    ids = torch.tensor(engine.tokenizer.encode(PASSAGES[1]))
    cache = KVCache.allocate(engine.model, ids.numel())
    forced = torch.ones(ids.numel(), dtype=torch.bool)
    result = blend_prefill(engine.model, PrefillInput(ids, forced, collect_pre_rope=True), BlendSpec(), cache)
    positions = torch.tensor([3, 4, 5, 9, 10])
    kv = turn_kv(engine.model, cache, positions)
    torch.testing.assert_close(kv.keys, result.pre_rope_k[:, :, positions], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv.values, cache.v[:, :, positions])


def _conversation(engine, blend: dict, window: int = 2, max_tokens: int = 24):
    """Six turns with passages as chunks; the client keeps the system message and its last 3
    turns (`window` earlier ones and the new one). Returns per turn: (answer token IDs, stats, segments)."""
    history, turns = [], []
    for i, question in enumerate(QUESTIONS):
        messages = [SYSTEM] + history[-2 * window:] + [{"role": "user", "content": question}]
        chunks = [engine.chunk_from_text(PASSAGES[(i + j) % 3]) for j in range(2)]
        segments = engine.chat_segments(messages, chunks)
        request = engine.make_request(f"conv-{i}-{blend}", segments, SamplingParams(max_tokens=max_tokens, temperature=0),
                                      BlendParams(**blend), user_turn=engine.user_turn(messages))
        out = engine.generate([request])[request.request_id]
        answer = out["token_ids"][:-1] if out["token_ids"][-1] in engine.eos_ids else out["token_ids"]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": engine.tokenizer.decode(answer)}]
        turns.append((out["token_ids"], out["stats"], segments))
    return turns


def test_windowed_conversation_at_ratio_one_equals_full_prefill(engine, fresh_prefix_cache):
    full = _conversation(engine, {"mode": "full_prefill"})
    blended = _conversation(engine, {"mode": "cacheblend", "recompute_ratio": 1.0})
    for i, ((ids_full, _, _), (ids_blend, stats, _)) in enumerate(zip(full, blended)):
        assert ids_blend == ids_full, f"turn {i}"
    # from the third turn on, earlier turns come back from the store at new positions
    assert all(stats.turn_tokens > 0 for _, stats, _ in blended[2:])
    assert all(stats.chunk_tokens > 0 for _, stats, _ in blended)
    assert engine.turns.kept > 0


def test_turn_blending_is_closer_to_full_prefill_than_reusing_turns_as_is(engine, fresh_prefix_cache):
    """At the default ratio: first-token KL against a full prefill of the same prompt, from turn
    4 on (the history has slid), against reusing the turn KV without recompute (reported)."""
    kl = {}
    for mode in ("cacheblend", "full_reuse"):
        turns = _conversation(engine, {"mode": mode})
        values = []
        for _, stats, segments in turns[3:]:
            assert stats.turn_tokens > 0
            reference = engine.prefill(segments, BlendParams(mode="full_prefill"), remember=False).result.logits
            served = engine.prefill(segments, BlendParams(mode=mode), remember=False).result.logits
            values.append(first_token_kl(reference, served))
        kl[mode] = sum(values) / len(values)
    print(f"first-token KL on turns 4-6: cacheblend {kl['cacheblend']:.4f}, full_reuse {kl['full_reuse']:.4f}")
    assert kl["cacheblend"] < kl["full_reuse"]
