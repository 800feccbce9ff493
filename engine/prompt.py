"""Render requests into segments: prefix, one segment per chunk, suffix.

Chat: the chunks go inside the last user turn, before its content, after an optional
preamble. The chat template is rendered with a sentinel as that turn's content and split
there, so template head and tail stay exactly what the model was trained on.
Completions: optional prefix, the chunks, then the prompt.
"""

from __future__ import annotations

from engine.segments import Segment, tokenize

_SENTINEL = "CACHEBLENDSEGMENTSENTINEL"


def _with_bos(tokenizer, ids: tuple[int, ...]) -> tuple[int, ...]:
    """Models whose tokenizer adds BOS (Llama 2/3, Mistral) get it once, at the very start."""
    probe = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and probe and probe[0] == bos and (not ids or ids[0] != bos):
        return (bos,) + ids
    return ids


def chat_segments(tokenizer, messages: list[dict], chunks: list[Segment], preamble: str = "") -> list[Segment]:
    """messages: OpenAI-style [{role, content}], content a str. The last message must be the user's."""
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
    head_ids = tokenize(tokenizer, head + (preamble if chunks else ""))
    segments = [Segment("prefix", head_ids)] if head_ids else []
    segments += chunks
    segments.append(Segment("suffix", tokenize(tokenizer, content + tail)))
    return segments


def completion_segments(tokenizer, prompt: str, chunks: list[Segment], prefix: str = "") -> list[Segment]:
    head_ids = _with_bos(tokenizer, tokenize(tokenizer, prefix) if prefix else ())
    segments = [Segment("prefix", head_ids)] if head_ids else []
    segments += chunks
    segments.append(Segment("suffix", tokenize(tokenizer, prompt)))
    return segments


def default_prefix_ids(tokenizer, preamble: str = "") -> tuple[int, ...]:
    """The prefix a chat request with no system message gets (the 'prefix' precompute convention)."""
    return chat_segments(tokenizer, [{"role": "user", "content": ""}], [Segment("chunk", (0,))], preamble)[0].token_ids
