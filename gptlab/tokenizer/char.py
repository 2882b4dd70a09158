"""Character-level tokenizer (the char-rnn / nanoGPT-shakespeare baseline): one id per character."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from gptlab.errors import GptlabError
from gptlab.tokenizer.base import EOT, AllowedSpecial, Tokenizer, as_id_list, check_special_tokens


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are the given characters in order; ``<|endoftext|>`` is id n."""

    kind = "char"

    def __init__(self, chars: str, special_tokens: dict[str, int] | None = None) -> None:
        if not isinstance(chars, str) or not chars:
            raise GptlabError("a char tokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise GptlabError("char tokenizer characters must be unique")
        self._chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._special = check_special_tokens(special_tokens or {EOT: len(chars)}, len(chars))
        self._itos = {i: c for c, i in self._stoi.items()} | {i: s for s, i in self._special.items()}
        self._vocab_size = max(self._itos) + 1

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary = sorted unique characters of all texts (streamed, never joined in memory)."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls.from_texts([text])

    @property
    def chars(self) -> str:
        return self._chars

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def _encode_plain(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise GptlabError(
                f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary "
                f"({len(self._chars)} characters); rebuild it from text that contains it"
            ) from None

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_plain(text)
        # Split on allowed special tokens (longest first so one cannot shadow a longer one).
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self._special[part])
            else:
                ids.extend(self._encode_plain(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Direct string join: exact round trip, no UTF-8 step needed.
        try:
            return "".join(self._itos[i] for i in as_id_list(ids))
        except KeyError as e:
            raise GptlabError(f"token id {e.args[0]} is out of range for a vocabulary of {self.vocab_size}") from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8", errors="surrogatepass")

    def _fields(self) -> dict[str, Any]:
        return {"chars": self._chars, "special_tokens": self._special}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(d["chars"], d["special_tokens"])
