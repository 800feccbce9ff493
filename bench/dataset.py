"""MuSiQue (musique_s.json) loading, the reference prompt layout, and answer scoring.

Layout (../shared/data/README.md, from the paper's scripts): an instruction prefix, each passage
plus "\\n\\n" as its own chunk, then a suffix holding the question. Through the engine's chat path
that becomes, with `Settings(chat_preamble=PREFIX)` and one user message whose content is the
suffix:

    [chat template head + PREFIX] [passage 1 + "\\n\\n"] ... [passage k + "\\n\\n"] [suffix + template tail]

so the instruction sits inside the user turn before the chunks, and the question after them.

Scoring follows the README: the first line of the generation (leading newlines skipped), SQuAD
normalisation (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed),
word-level token F1, best over the gold answers. Two empty answers agree (F1 1), one empty answer
scores 0. (The paper's own script differs in small ways we do not copy: it lower-cases the
question's first letter, counts model-tokenizer tokens instead of words and maps answers
starting with yes/no to "Yes"/"No".)
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from engine.quality import token_f1 as bag_f1

DEFAULT_DATASET = Path("../shared/data/musique_s.json")

PREFIX = ("You will be asked a question after reading several passages. Please directly answer the question "
          "based on the given passages. Do NOT repeat the question. The answer should be within 5 words.\nPassages:\n")
SUFFIX_TEMPLATE = ("\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
                   "The answer should be within 5 words. \nQuestion: {question}\nAnswer:")


@dataclass(frozen=True)
class Record:
    index: int                 # position in the dataset file
    question: str
    answers: tuple[str, ...]
    passages: tuple[str, ...]  # passage texts, in retrieval order


def load(path: Path | str = DEFAULT_DATASET) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset not found (expected musique_s.json from ../shared/data)")
    raw = json.loads(path.read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    out = []
    for i, r in enumerate(raw):
        try:
            passages = tuple(_passage_text(c) for c in r["ctxs"])
            out.append(Record(i, r["question"], tuple(r["answers"]), passages))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: record {i} lacks question/answers/ctxs") from e
    return out


def _passage_text(ctx: dict) -> str:
    """A passage's text; a non-empty title goes in front (empty in every musique_s record)."""
    title = (ctx.get("title") or "").strip()
    return f"{title}\n\n{ctx['text']}" if title else ctx["text"]


def select(records: Sequence[Record], limit: Optional[int] = None, seed: Optional[int] = None, shuffle: bool = False) -> list[Record]:
    """The first `limit` records, or `limit` records drawn with `seed` when `shuffle` (same seed, same set)."""
    records = list(records)
    if shuffle:
        random.Random(seed).shuffle(records)
    return records[:limit] if limit is not None else records


# The evaluation protocol (BENCHMARKS.md): design on the dev split (questions 0-49), report on
# the report split (50-129), and never run these, so that one untouched set is left.
RESERVED = range(130, 150)


def parse_range(text: str) -> tuple[int, int]:
    """'50-129' -> (50, 129), both ends included; '7' -> (7, 7)."""
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"expected a question range like 50-129, got {text!r}") from None
    if a < 0 or b < a:
        raise ValueError(f"empty or negative question range {text!r}")
    return a, b


def select_questions(records: Sequence[Record], first: int = 0, last: Optional[int] = None, limit: Optional[int] = None,
                     seed: Optional[int] = None, shuffle: bool = False, allow_reserved: bool = False) -> list[Record]:
    """The records with index in [first, last], then `select(limit, seed, shuffle)` among them.

    Unless `allow_reserved`, a range that names a reserved question is refused, and an open
    range (`last` None) that starts before them stops before them.
    """
    if last is None:
        last = len(records) - 1
        if not allow_reserved and first < RESERVED.start:
            last = min(last, RESERVED.start - 1)
    hit = [i for i in RESERVED if first <= i <= last]
    if hit and not allow_reserved:
        raise ValueError(f"questions {RESERVED.start}-{RESERVED.stop - 1} are reserved by the evaluation protocol "
                         f"(BENCHMARKS.md) and never run; the range {first}-{last} includes {len(hit)} of them "
                         "(--allow-reserved overrides)")
    return select([r for r in records if first <= r.index <= last], limit, seed, shuffle)


def truncate(record: Record, max_chars: Optional[int]) -> Record:
    """The record with each passage cut to at most `max_chars` characters, at a word boundary
    (for quick smoke runs and tests; None keeps the passages whole)."""
    if not max_chars:
        return record
    def cut(text: str) -> str:
        if len(text) <= max_chars:
            return text
        head = text[:max_chars]
        return head.rsplit(" ", 1)[0] if " " in head else head
    return Record(record.index, record.question, record.answers, tuple(cut(p) for p in record.passages))


def long_document(records: Sequence[Record], min_chars: int) -> str:
    """A long text for the document benchmark and tests: the distinct passages of `records`, in
    order, joined by blank lines, up to the first that brings it to `min_chars` characters
    (ValueError if all of them fall short)."""
    seen, parts, size = set(), [], 0
    for passage in (p for r in records for p in r.passages):
        if passage not in seen:
            seen.add(passage)
            parts.append(passage)
            size += len(passage) + 2
            if size - 2 >= min_chars:
                return "\n\n".join(parts)
    raise ValueError(f"these {len(records)} records hold fewer than {min_chars} characters of distinct passages")


# --- prompt layout -----------------------------------------------------------------------


def suffix_for(question: str) -> str:
    return SUFFIX_TEMPLATE.format(question=question)


def chunk_texts(record: Record, num_passages: Optional[int] = None) -> list[str]:
    """The chunk texts: each passage followed by a blank line, the first `num_passages` of them."""
    passages = record.passages if num_passages is None else record.passages[:num_passages]
    return [p + "\n\n" for p in passages]


def messages_for(record: Record) -> list[dict]:
    """The chat messages: one user turn whose content is the suffix (chunks go in front of it)."""
    return [{"role": "user", "content": suffix_for(record.question)}]


def prompt_text(record: Record, num_passages: Optional[int] = None) -> str:
    """The raw (untemplated) prompt: PREFIX + chunks + suffix, for reading and for tests."""
    return PREFIX + "".join(chunk_texts(record, num_passages)) + suffix_for(record.question)


def build_segments(engine, record: Record, num_passages: Optional[int] = None) -> list:
    """Segments [head + PREFIX] [chunk]... [suffix + tail] for `engine`.

    The engine must have been built with `chat_preamble=PREFIX` (see `eval_settings`): the
    preamble is what puts the instruction in the user turn ahead of the chunks.
    """
    if engine.settings.chat_preamble != PREFIX:
        raise ValueError("build the engine with Settings(chat_preamble=bench.dataset.PREFIX)")
    chunks = [engine.chunk_from_text(t) for t in chunk_texts(record, num_passages)]
    return engine.chat_segments(messages_for(record), chunks)


# --- scoring -----------------------------------------------------------------------------


def first_line(generation: str) -> str:
    """The answer: the generation's first line after any leading newlines, trimmed."""
    return generation.lstrip("\n").split("\n", 1)[0].strip()


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    """Word-level F1 of two answers after normalisation (both empty: 1; one empty: 0)."""
    return bag_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def best_f1(prediction: str, answers: Sequence[str]) -> float:
    """F1 of `prediction` against the closest gold answer."""
    return max((token_f1(prediction, a) for a in answers), default=0.0)


def exact_match(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)
