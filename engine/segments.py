"""A prompt is an ordered list of segments, each tokenized alone.

The token IDs of the segments are concatenated and the combined text is never re-tokenized:
re-tokenizing can merge tokens across a boundary, and then a chunk's cached KV no longer lines
up with its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

SegmentKind = Literal["prefix", "turn", "chunk", "suffix"]


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    token_ids: tuple[int, ...]
    chunk_key: Optional[str] = None  # set on chunks and turns: the content key of their KV
    salt: str = ""                   # chunks: the salt their key was made with (a tenant's; "" when shared)

    def __len__(self) -> int:
        return len(self.token_ids)


def tokenize(tokenizer, text: str, add_special_tokens: bool = False) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def spans(segments: list[Segment]) -> list[tuple[int, int]]:
    """[start, end) token positions of each segment in the concatenated prompt."""
    out, pos = [], 0
    for seg in segments:
        out.append((pos, pos + len(seg)))
        pos += len(seg)
    return out


def token_ids(segments: list[Segment]) -> list[int]:
    return [t for seg in segments for t in seg.token_ids]
