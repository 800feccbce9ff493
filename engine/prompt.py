"""Render requests into segments: prefix, one segment per chunk, suffix.

Chat: the chunks go inside the last user turn, before its content, after an optional
preamble. The chat template is rendered with a sentinel as that turn's content and split
there, so template head and tail stay exactly what the model was trained on.
Every earlier message (after a leading system message) is a "turn" segment of its own, keyed
by its content: the prefix cache then matches a conversation message by message, and with turn
reuse a turn's KV is blended back wherever it appears again. The head becomes
[prefix, turn, ..., turn, prefix (the last turn's header)].
Completions: optional prefix, the chunks, then the prompt.
"""

from __future__ import annotations

from typing import Callable, Optional

from engine.segments import Segment, tokenize

TurnKeyFn = Callable[[tuple[int, ...]], str]  # a turn's token IDs -> its content key

# Rendering a message after this one and cutting it off gives the message's own text.
_ANCHOR = {"role": "system", "content": "A"}

_SENTINEL = "CACHEBLENDSEGMENTSENTINEL"


def _with_bos(tokenizer, ids: tuple[int, ...]) -> tuple[int, ...]:
    """Models whose tokenizer adds BOS (Llama 2/3, Mistral) get it once, at the very start."""
    probe = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and probe and probe[0] == bos and (not ids or ids[0] != bos):
        return (bos,) + ids
    return ids


def chat_segments(tokenizer, messages: list[dict], chunks: list[Segment], preamble: str = "",
                  turn_key: Optional[TurnKeyFn] = None) -> list[Segment]:
    """messages: OpenAI-style [{role, content}], content a str. The last message must be the user's.
    `turn_key`: split earlier messages into turn segments (None: one prefix segment)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the last message must have role 'user' (chunks go into the last user turn)")
    templated = [dict(m) for m in messages]
    content = templated[-1]["content"]
    sentinel = _SENTINEL
    while any(sentinel in m["content"] for m in messages):  # a message may quote it: make it unique
        sentinel += "X"
    templated[-1]["content"] = sentinel
    rendered = tokenizer.apply_chat_template(templated, tokenize=False, add_generation_prompt=True)
    if rendered.count(sentinel) != 1:
        raise ValueError("the chat template does not place the user content verbatim; cannot split it")
    head, tail = rendered.split(sentinel)
    head += preamble if chunks else ""
    split = _split_turns(tokenizer, messages, head) if turn_key is not None else None
    if split is None:
        segments = [Segment("prefix", tokenize(tokenizer, head))] if head else []
    else:
        lead, turns, header = split
        segments = [Segment("prefix", tokenize(tokenizer, lead))] if lead else []
        segments += [Segment("turn", ids, turn_key(ids)) for ids in (tokenize(tokenizer, t) for t in turns)]
        segments += [Segment("prefix", tokenize(tokenizer, header))] if header else []
    segments += chunks
    segments.append(Segment("suffix", tokenize(tokenizer, content + tail)))
    return segments


def turn_text(tokenizer, message: dict) -> Optional[str]:
    """One message as the chat template renders it among others (None: the template cannot)."""
    try:
        before = tokenizer.apply_chat_template([_ANCHOR], tokenize=False)
        after = tokenizer.apply_chat_template([_ANCHOR, message], tokenize=False)
    except Exception:  # templates may refuse a lone system message or a role order
        return None
    return after[len(before):] if after.startswith(before) and len(after) > len(before) else None


def turn_ids(tokenizer, message: dict) -> Optional[tuple[int, ...]]:
    text = turn_text(tokenizer, message)
    return tokenize(tokenizer, text) if text is not None else None


def _split_turns(tokenizer, messages: list[dict], head: str) -> Optional[tuple[str, list[str], str]]:
    """head -> (lead, [turn text], last turn's header), or None when there is no earlier turn or
    the template does not render messages independently (then the head stays one segment)."""
    earlier = messages[1:-1] if messages[0]["role"] == "system" else messages[:-1]
    texts = [turn_text(tokenizer, m) for m in earlier]
    if not texts or any(t is None for t in texts):
        return None
    body = "".join(texts)
    at = head.rfind(body)
    if at < 0:
        return None
    return head[:at], texts, head[at + len(body):]


def completion_segments(tokenizer, prompt: str, chunks: list[Segment], prefix: str = "") -> list[Segment]:
    head_ids = _with_bos(tokenizer, tokenize(tokenizer, prefix) if prefix else ())
    segments = [Segment("prefix", head_ids)] if head_ids else []
    segments += chunks
    segments.append(Segment("suffix", tokenize(tokenizer, prompt)))
    return segments


def default_prefix_ids(tokenizer, preamble: str = "") -> tuple[int, ...]:
    """The prefix a chat request with no system message gets (the 'prefix' precompute convention)."""
    return chat_segments(tokenizer, [{"role": "user", "content": ""}], [Segment("chunk", (0,))], preamble)[0].token_ids
