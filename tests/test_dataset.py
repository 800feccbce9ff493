"""bench/dataset.py: SQuAD-style answer scoring (hand-checked cases) and the MuSiQue prompt layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import dataset as ds

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "musique_s.json"


# --- normalisation and F1 -------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  A  cat,   an apple ", "cat apple"),
    ("U.S.A.", "usa"),
    ("Exeter College.", "exeter college"),
    ("the", ""),
    ("Théâtre du Châtelet", "théâtre du châtelet"),   # only ASCII punctuation goes; accents stay
    ("Anne's theory", "annes theory"),               # apostrophe removed, not split
    ("another thing", "another thing"),              # 'an' only as a whole word
    ("1,000 km", "1000 km"),
    ("Line one\nline two", "line one line two"),
])
def test_normalize_answer(raw, norm):
    assert ds.normalize_answer(raw) == norm


@pytest.mark.parametrize("pred, gold, f1", [
    ("Exeter College", "exeter college.", 1.0),
    ("College of Exeter", "Exeter College", 0.8),     # P = 2/3, R = 1
    ("new new york", "New York", 0.8),                # repeated token counted once in the overlap
    ("Paris", "London", 0.0),
    ("the University of Oxford", "Oxford", 0.5),      # P = 1/3, R = 1
    ("", "", 1.0),                                    # both empty: agree
    ("", "Paris", 0.0),
    ("the", "a", 1.0),                                # both empty after normalisation
])
def test_token_f1(pred, gold, f1):
    assert ds.token_f1(pred, gold) == pytest.approx(f1)


def test_best_f1_takes_closest_gold():
    assert ds.best_f1("Oxford", ["Cambridge", "University of Oxford"]) == pytest.approx(2 * (1 * 1 / 3) / (1 + 1 / 3))
    assert ds.best_f1("x", []) == 0.0


@pytest.mark.parametrize("gen, line", [
    ("\n\nExeter College\nBecause ...", "Exeter College"),
    (" Paris  ", "Paris"),
    ("Paris", "Paris"),
    ("", ""),
])
def test_first_line(gen, line):
    assert ds.first_line(gen) == line


def test_exact_match_uses_normalisation():
    assert ds.exact_match("The Beatles.", "beatles")
    assert not ds.exact_match("Beatles", "Rolling Stones")


# --- layout ---------------------------------------------------------------------------------

def test_prefix_and_suffix_follow_the_readme():
    assert ds.PREFIX == ("You will be asked a question after reading several passages. Please directly answer the question "
                         "based on the given passages. Do NOT repeat the question. The answer should be within 5 words.\nPassages:\n")
    assert ds.suffix_for("Who?") == ("\n\nAnswer the question directly based on the given passages. Do NOT repeat the "
                                     "question. The answer should be within 5 words. \nQuestion: Who?\nAnswer:")


def _record(passages=("alpha beta", "gamma delta epsilon")) -> ds.Record:
    return ds.Record(0, "Who wrote it?", ("Someone",), tuple(passages))


def test_chunk_texts_and_prompt_text():
    rec = _record()
    assert ds.chunk_texts(rec) == ["alpha beta\n\n", "gamma delta epsilon\n\n"]
    assert ds.chunk_texts(rec, 1) == ["alpha beta\n\n"]
    assert ds.prompt_text(rec) == ds.PREFIX + "alpha beta\n\ngamma delta epsilon\n\n" + ds.suffix_for("Who wrote it?")


def test_truncate_cuts_at_word_boundary():
    rec = ds.truncate(_record(("one two three four",)), 9)
    assert rec.passages == ("one two",)
    assert ds.truncate(_record(), None) == _record()


def test_load_and_select(tmp_path):
    raw = [{"question": f"q{i}", "answers": [f"a{i}"], "ctxs": [{"title": "", "text": f"p{i}"}, {"title": "T", "text": "x"}]}
           for i in range(6)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(raw))
    recs = ds.load(path)
    assert [r.question for r in recs] == [f"q{i}" for i in range(6)]
    assert recs[0].passages == ("p0", "T\n\nx")  # a non-empty title goes in front
    assert [r.index for r in ds.select(recs, 2)] == [0, 1]
    a = [r.index for r in ds.select(recs, 3, seed=7, shuffle=True)]
    assert a == [r.index for r in ds.select(recs, 3, seed=7, shuffle=True)]  # same seed, same draw
    assert len(set(a)) == 3


@pytest.mark.parametrize("text, pair", [("50-129", (50, 129)), ("7", (7, 7)), ("0-0", (0, 0))])
def test_parse_range(text, pair):
    assert ds.parse_range(text) == pair


@pytest.mark.parametrize("text", ["9-3", "a-b", "-4", "1-", ""])
def test_parse_range_rejects(text):
    with pytest.raises(ValueError):
        ds.parse_range(text)


def test_select_questions_splits_and_reserved():
    recs = [ds.Record(i, f"q{i}", ("a",), ("p",)) for i in range(150)]
    idx = lambda **kw: [r.index for r in ds.select_questions(recs, **kw)]  # noqa: E731
    assert idx(first=50, last=129) == list(range(50, 130))                 # the report split
    assert idx(first=50, last=129, limit=3) == [50, 51, 52]
    drawn = idx(first=0, last=49, limit=5, seed=1, shuffle=True)
    assert len(set(drawn)) == 5 and all(i < 50 for i in drawn)
    assert idx() == list(range(130))                                       # an open range stops before the reserved ones
    assert idx(first=120, limit=20) == list(range(120, 130))
    assert max(idx(limit=150, seed=0, shuffle=True)) < 130                 # nor can a random draw reach them
    for kw in ({"first": 120, "last": 135}, {"first": 140}, {"first": 149, "last": 149}):
        with pytest.raises(ValueError, match="reserved"):
            ds.select_questions(recs, **kw)
    assert idx(first=140, allow_reserved=True) == list(range(140, 150))
    assert idx(allow_reserved=True) == list(range(150))


@pytest.mark.skipif(not DATA.is_file(), reason="../shared/data/musique_s.json not present")
def test_real_dataset_shape():
    recs = ds.load(DATA)
    assert len(recs) == 150
    assert all(len(r.passages) == 10 and r.answers for r in recs)


class _TokenizerEngine:
    """Just what build_segments uses of LLMEngine: settings, chunk_from_text, chat_segments."""

    def __init__(self, tokenizer):
        from config.settings import Settings

        self.tokenizer = tokenizer
        self.settings = Settings(chat_preamble=ds.PREFIX)

    def chunk_from_text(self, text):
        from engine.segments import Segment, tokenize
        return Segment("chunk", tokenize(self.tokenizer, text))

    def chat_segments(self, messages, chunks):
        from engine.prompt import chat_segments
        return chat_segments(self.tokenizer, messages, chunks, self.settings.chat_preamble)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from config.settings import Settings
    from engine.loader import resolve_model_dir

    s = Settings()
    return AutoTokenizer.from_pretrained(str(resolve_model_dir(s.model, s.data_dir)))


def test_segments_render_the_chat_template(tokenizer):
    rec = _record(("Exeter College is a college of Oxford.", "Hannibal and Scipio is a play."))
    segs = ds.build_segments(_TokenizerEngine(tokenizer), rec)
    assert [s.kind for s in segs] == ["prefix", "chunk", "chunk", "suffix"]
    head = tokenizer.decode(segs[0].token_ids)
    assert head.endswith("<|im_start|>user\n" + ds.PREFIX)            # instruction inside the user turn, before the chunks
    assert tokenizer.decode(segs[1].token_ids) == rec.passages[0] + "\n\n"
    assert tokenizer.decode(segs[2].token_ids) == rec.passages[1] + "\n\n"
    tail = tokenizer.decode(segs[3].token_ids)
    assert tail.startswith(ds.suffix_for(rec.question))
    assert tail.endswith("<|im_start|>assistant\n")                  # generation prompt
    # the whole prompt is exactly the chat template around PREFIX + chunks + suffix
    whole = tokenizer.apply_chat_template([{"role": "user", "content": ds.prompt_text(rec)}], tokenize=False,
                                          add_generation_prompt=True)
    assert tokenizer.decode([t for s in segs for t in s.token_ids]) == whole


def test_build_segments_needs_the_preamble(tokenizer):
    eng = _TokenizerEngine(tokenizer)
    eng.settings = eng.settings.model_copy(update={"chat_preamble": ""})
    with pytest.raises(ValueError, match="chat_preamble"):
        ds.build_segments(eng, _record())
