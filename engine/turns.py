"""Turn KV: a conversation's messages kept as they are processed, for reuse at other positions.

A turn's KV is cut out of the fused cache of the request that processed it: K un-rotated back
to pre-RoPE (so it is placed anywhere, like a chunk's), V as is; stored under the turn's
content key in the chunk store (same tiers, eviction and integrity rules). When the turn shows
up again at another position (a client that keeps the last N turns, drops old passages, or
resumes on another replica), the blend prefill reuses it like a chunk and recomputes the
tokens whose KV deviates most.

Kept, each once:
- every turn segment a prefill had to compute (first seen, or evicted since);
- the request's own last user turn and, after an EOS, the assistant reply as generated, so the
  next request of the conversation finds both. The reply's closing template tokens (end of turn,
  newline) are never fed during generation: they are run now with decode steps.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from engine.blend import KVCache
from engine.decode import decode_step
from engine.model import Transformer
from engine.prompt import turn_ids
from engine.segments import Segment, spans
from kvstore.base import ChunkKV, ChunkStore

log = logging.getLogger(__name__)

# A reply whose rendering needs more unfed tokens than this is not a plain "content + closing" turn.
MAX_CLOSING_TOKENS = 4


def turn_kv(model: Transformer, cache: KVCache, positions: torch.Tensor) -> ChunkKV:
    """KV of the tokens at `positions` [T] of a fused cache: pre-RoPE K [L, Hkv, T, D], V."""
    k = cache.k[:, :, positions]                          # [L, Hkv, T, D] post-RoPE
    keys = torch.stack([model.unrotate(k[layer], positions, cache.length) for layer in range(k.shape[0])])
    return ChunkKV(keys, cache.v[:, :, positions].clone(), 0, "computed")


def user_positions(turn: Sequence[int], header: Sequence[int], suffix: Sequence[int]) -> Optional[tuple[int, int]]:
    """How a rendered user turn lies across the last turn's header and the suffix (the chunks
    sit between them): (h, r), its first h tokens ending the header and the other r starting
    the suffix; None if it does not line up (e.g. a preamble before the chunks)."""
    for h in range(1, min(len(header), len(turn)) + 1):
        r = len(turn) - h
        if tuple(header[len(header) - h:]) == tuple(turn[:h]) and tuple(suffix[:r]) == tuple(turn[h:]):
            return h, r
    return None


def reply_positions(reply: Sequence[int], prompt: Sequence[int], fed: Sequence[int]) -> Optional[tuple[list[int], list[int]]]:
    """Where a rendered reply turn lies in prompt + fed output tokens: (positions of the part
    already in the cache, the closing tokens still to run), or None if it does not line up.
    The reply starts with the generation prompt (the prompt's last g tokens)."""
    n = len(prompt)
    for g in range(1, min(len(prompt), len(reply)) + 1):
        have = g + len(fed)
        if (tuple(prompt[n - g:]) == tuple(reply[:g]) and tuple(reply[g:have]) == tuple(fed)
                and 0 < len(reply) - have <= MAX_CLOSING_TOKENS):
            return list(range(n - g, n + len(fed))), list(reply[have:])
    return None


class TurnKeeper:
    """Stores turn KV from finished prefills and generations (engine thread)."""

    def __init__(self, model: Transformer, tokenizer, store: ChunkStore, turn_key: Callable[[tuple[int, ...], str], str]):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.turn_key = turn_key
        self.kept = 0

    def keep_prompt(self, segments: Sequence[Segment], computed: Sequence[int], cache: KVCache,
                    user_turn: Optional[tuple[int, ...]], salt: str = "") -> None:
        """After a prefill: the turn segments it computed (indices into `segments`), and the
        last user turn `user_turn` (its rendered token IDs) from the text around the chunks,
        keyed under the request's `salt`."""
        bounds = spans(list(segments))
        for i in computed:
            s, e = bounds[i]
            self._put(segments[i].chunk_key, torch.arange(s, e, device=self.model.device), cache)
        header = max((i for i, seg in enumerate(segments) if seg.kind == "prefix"), default=None)
        if user_turn and header is not None and segments[-1].kind == "suffix":
            found = user_positions(user_turn, segments[header].token_ids, segments[-1].token_ids)
            if found is not None:
                (h, r), end, start = found, bounds[header][1], bounds[-1][0]
                positions = list(range(end - h, end)) + list(range(start, start + r))
                self._put(self.turn_key(user_turn, salt), torch.tensor(positions, device=self.model.device), cache)

    def keep_reply(self, prompt: Sequence[int], output_ids: list[int], cache: KVCache, salt: str = "") -> None:
        """After a chat generation that ended in EOS: the assistant reply as the client will
        send it back (keyed under the request's `salt`). `output_ids` ends with the EOS token (never fed)."""
        content = self.tokenizer.decode(output_ids[:-1])
        reply = turn_ids(self.tokenizer, {"role": "assistant", "content": content})
        found = reply_positions(reply, prompt, output_ids[:-1]) if reply else None
        key = self.turn_key(tuple(reply), salt) if reply else ""
        if found is None or cache.length + len(found[1]) > cache.k.shape[2] or self.store.contains(key):
            return
        positions, closing = found
        positions += list(range(cache.length, cache.length + len(closing)))
        for token in closing:
            decode_step(self.model, [cache], [token])
        self._put(key, torch.tensor(positions, device=self.model.device), cache)

    def _put(self, key: str, positions: torch.Tensor, cache: KVCache) -> None:
        if self.store.contains(key):
            return
        self.store.put(key, turn_kv(self.model, cache, positions))
        self.kept += 1
