"""Tokenizers: one interface for text (``Tokenizer``: char, trained BPE, GPT-2 BPE), one for other modalities
(``Codec``: the learned image and speech tokenizers), and the omni vocabulary that joins them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.tokenizer.audio import MelAudioCodec
from gptlab.tokenizer.base import EOT, TOKENIZER_FILE, Codec, Tokenizer, load_tokenizer
from gptlab.tokenizer.bpe import BPETokenizer, gpt2_tokenizer
from gptlab.tokenizer.char import CharTokenizer
from gptlab.tokenizer.image import PatchImageCodec
from gptlab.tokenizer.omni import OmniTokenizer
from gptlab.tokenizer.train_bpe import train_bpe

__all__ = [
    "EOT", "TOKENIZER_FILE", "Tokenizer", "CharTokenizer", "BPETokenizer",
    "gpt2_tokenizer", "train_bpe", "load_tokenizer", "build_tokenizer",
    "Codec", "PatchImageCodec", "MelAudioCodec", "OmniTokenizer",
]

SPEC_FORMS = "'gpt2', 'char', 'bpe:N' (N merges, e.g. bpe:8000), or a path to a saved tokenizer file or its directory"


def build_tokenizer(spec: str, texts: Iterable[str] | None = None, progress: bool = True) -> Tokenizer:
    """Make a tokenizer from a spec string; 'char' and 'bpe:N' are trained on ``texts``."""
    spec = spec.strip()
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "char" or spec.startswith("bpe:") or spec == "bpe":
        if spec != "char" and not re.fullmatch(r"bpe:\d+", spec):
            raise GptlabError(f"bad tokenizer spec {spec!r}: use {SPEC_FORMS}")
        if texts is None:
            raise GptlabError(f"tokenizer spec {spec!r} needs training text")
        if isinstance(texts, str):
            texts = [texts]
        if spec == "char":
            return CharTokenizer.from_texts(texts)
        return train_bpe(texts, int(spec[4:]), progress=progress)
    if spec and Path(spec).exists():
        return load_tokenizer(spec)
    raise GptlabError(f"unknown tokenizer spec {spec!r} (no such file): use {SPEC_FORMS}")
