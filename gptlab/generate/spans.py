"""Decoding an omni model's reply: which tokens may come next, and what the tokens mean.

`SpanGrammar` keeps, per row, whether it is in text, in an image span or in an audio span, and masks the
logits: in an image span only image codes, exactly the codec's tokens per image, then <|/image|>; in an
audio span only audio codes until <|/audio|> (forced after `max_audio_codes`); outside spans no codes and no
closing markers, and only the openers of the modalities asked for. `SpanReader` reads a reply token by token
into media parts (the server streams with it: `AudioChunker` decodes speech in pieces while it is generated,
so playback starts before the reply ends); `split_reply` turns finished ids into text, image and audio parts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer.omni import MARKERS, OmniTokenizer


class SpanGrammar:
    def __init__(self, tok: OmniTokenizer, rows: list[list[int]], modalities: Sequence[str] = (),
                 max_audio_codes: int = 1500):
        self.tok = tok
        self.out = [m for m in ("image", "audio") if tok.has(m) and (not modalities or m in modalities)]
        self.ranges = {m: tok.code_range(m) for m in ("image", "audio") if tok.has(m)}
        self.open = {tok.markers[MARKERS[m][0]]: m for m in self.ranges}
        self.close = {m: tok.markers[MARKERS[m][1]] for m in self.ranges}
        self.image_len = tok.codecs["image"].tokens_per_item if "image" in self.ranges else 0
        self.max_audio = max_audio_codes
        self.state: list[tuple[str | None, int]] = [(None, 0)] * len(rows)
        for i, r in enumerate(rows):
            for t in r:
                self._advance(i, t)
        V = tok.vocab_size
        self._outside = torch.ones(V, dtype=torch.bool)  # allowed outside spans
        for m, r in self.ranges.items():
            self._outside[r.start:r.stop] = False
            self._outside[self.close[m]] = False
            if m not in self.out:
                self._outside[tok.markers[MARKERS[m][0]]] = False
        self._inside = {}
        for m, r in self.ranges.items():
            codes = torch.zeros(V, dtype=torch.bool)
            codes[r.start:r.stop] = True
            close = torch.zeros(V, dtype=torch.bool)
            close[self.close[m]] = True
            self._inside[m] = (codes, close, codes | close)

    def _advance(self, i: int, t: int) -> None:
        span, n = self.state[i]
        if span is None:
            self.state[i] = (self.open.get(t), 0)
        elif t == self.close[span]:
            self.state[i] = (None, 0)
        else:
            self.state[i] = (span, n + 1)

    def allowed(self, i: int) -> torch.Tensor:
        span, n = self.state[i]
        if span is None:
            return self._outside
        codes, close, either = self._inside[span]
        if span == "image":
            return codes if n < self.image_len else close
        return either if n < self.max_audio else close

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with every token the grammar forbids at -inf."""
        if self._outside.device != logits.device:  # the masks live where the logits are: no copy per step
            self._outside = self._outside.to(logits.device)
            self._inside = {m: tuple(t.to(logits.device) for t in ts) for m, ts in self._inside.items()}
        allowed = torch.stack([self.allowed(i) for i in range(len(self.state))])
        return logits.masked_fill(~allowed[:, :logits.size(-1)], float("-inf"))

    def push(self, tokens: list[int]) -> None:
        for i, t in enumerate(tokens):
            self._advance(i, t)


class SpanReader:
    """Reads a reply token by token: `feed(t)` -> (whether t is media: a code or a marker, events). Events are
    parts: {"type": "image", "image"} when an image span closes; {"type": "audio", "audio", "codes"} when an
    audio span closes, or with `chunk`, a piece of audio every `chunk` codes (streaming)."""

    def __init__(self, tok: OmniTokenizer, chunk: int | None = None):
        self.tok, self.chunk = tok, chunk
        self.opens = {tok.markers[MARKERS[m][0]]: m for m in ("image", "audio") if tok.has(m)}
        self.closes = {tok.markers[MARKERS[m][1]] for m in self.opens.values()}
        self.span: str | None = None
        self.codes: list[int] = []
        self.chunker: AudioChunker | None = None

    def feed(self, t: int) -> tuple[bool, list[dict]]:
        if self.span is None:
            if t in self.opens:
                self.span, self.codes = self.opens[t], []
                self.chunker = AudioChunker(self.tok, self.chunk) if self.span == "audio" and self.chunk else None
                return True, []
            return t in self.closes, []
        if t in self.closes:
            return True, self.close()
        self.codes.append(t)
        wave = self.chunker.push(t) if self.chunker is not None else None
        return True, ([{"type": "audio", "audio": wave}] if wave is not None else [])

    def close(self) -> list[dict]:
        """End the open span (its marker came, or the reply ended inside it): what it holds. An image missing
        codes is dropped."""
        span, codes, self.span = self.span, self.codes, None
        if span == "audio" and self.chunker is not None:
            wave = self.chunker.finish()
            return [{"type": "audio", "audio": wave}] if wave is not None else []
        if span == "audio" and codes:
            return [{"type": "audio", "audio": self.tok.decode_media("audio", codes), "codes": len(codes)}]
        if span == "image" and len(codes) == self.tok.codecs["image"].tokens_per_item:
            return [{"type": "image", "image": self.tok.decode_media("image", codes)}]
        return []


def split_reply(tok: OmniTokenizer, ids: Sequence[int]) -> list[dict]:
    """A reply's ids -> parts in order: {"type": "text", "text"}, {"type": "image", "image": (H, W) array},
    {"type": "audio", "audio": 16 kHz waveform, "codes": n}. An unfinished span at the end (the reply ran
    out of tokens) is decoded as far as it goes."""
    reader, parts, text = SpanReader(tok), [], []

    def flush_text():
        s = tok.decode(text) if text else ""
        if s:
            parts.append({"type": "text", "text": s})
        text.clear()

    for t in ids:
        media, events = reader.feed(t)
        if not media:
            text.append(t)
        elif events or reader.span is not None:
            flush_text()
            parts.extend(events)
    flush_text()
    if reader.span is not None:
        parts.extend(reader.close())
    return parts


class AudioChunker:
    """Decode an audio span while it is generated: every `chunk` codes, the new audio (Griffin-Lim over the
    span so far plus the new codes, with `context` codes of left context for smooth joins)."""

    def __init__(self, tok: OmniTokenizer, chunk: int = 10, context: int = 10):
        if not tok.has("audio"):
            raise GptlabError("this model has no audio tokenizer")
        self.tok, self.chunk, self.context = tok, chunk, context
        self.codes: list[int] = []
        self.done = 0  # codes already turned into audio
        self.hop = tok.codecs["audio"].hop

    def push(self, code_id: int) -> np.ndarray | None:
        self.codes.append(code_id)
        return self._emit() if len(self.codes) - self.done >= self.chunk else None

    def finish(self) -> np.ndarray | None:
        return self._emit() if len(self.codes) > self.done else None

    def _emit(self) -> np.ndarray:
        lo = max(0, self.done - self.context)
        wave = self.tok.decode_media("audio", self.codes[lo:])
        start = (self.done - lo) * self.hop
        self.done = len(self.codes)
        return wave[start:]
