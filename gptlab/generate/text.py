"""Token ids -> text as they arrive: never splits a UTF-8 character, and holds back text that might be
the start of a stop string so a stream never shows a stop string it later removes."""

from __future__ import annotations

import codecs

from gptlab.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = (), keep_stop: bool = False):
        self.tok, self.stops, self.keep_stop = tokenizer, stops, keep_stop
        self.special = set(tokenizer.special_tokens.values())
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_id: int) -> bool:
        """Add one token; returns True when a stop string has appeared (text is cut before it)."""
        if token_id in self.special:  # special tokens are control, not text
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += self.decoder.decode(self.tok.decode_bytes([token_id]))
        hits = [(i, -len(s), s) for i, s in ((self.text.find(s, start), s) for s in self.stops) if i >= 0]
        if hits:  # cut at the earliest stop string, whichever completed (after it, when it is kept)
            i, _, s = min(hits)
            self.text, self.stopped = self.text[:i + (len(s) if self.keep_stop else 0)], True
        return self.stopped

    def finish(self) -> None:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)

    def delta(self, final: bool = False) -> str:
        """Text not yet emitted; unless final, minus a tail that could still grow into a stop string."""
        safe = len(self.text)
        if not final and not self.stopped:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return out
