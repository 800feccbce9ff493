"""Incremental detokenization with stop strings.

Text that could still turn into a stop string is held back, so a stream never shows a stop
string or half of one; a partial UTF-8 character (the replacement char) is held back too.
"""

from __future__ import annotations

from typing import Optional


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.sent = 0          # characters already emitted
        self.text = ""

    def add(self, token_id: int) -> tuple[str, Optional[str]]:
        """Append a token; return (new text to emit, the stop string hit or None)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for s in self.stop:
            i = self.text.find(s)
            if i != -1:
                self.text = self.text[:i]
                return self._emit(len(self.text)), s
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:n]):
                    safe = min(safe, len(self.text[:safe]) - n)
                    break
        return self._emit(safe), None

    def flush(self) -> str:
        """At the end, emit whatever was held back."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
