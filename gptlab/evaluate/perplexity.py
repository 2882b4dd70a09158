"""Perplexity and bits per byte of text files (GPT-2's zero-shot language modelling), with rolling windows:
every token is predicted exactly once, each with as much context as the window allows (see
`scoring.rolling_pairs`). Each file is one document conditioned on the end-of-text token.

bits per byte = total nats / (ln 2 · UTF-8 bytes): tokenizer-independent, so runs with different
vocabularies compare. Also reported, as lm-eval names them: byte_perplexity = exp(nats / bytes) and
word_perplexity = exp(nats / words) with words = whitespace-separated pieces."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from gptlab.errors import GptlabError
from gptlab.evaluate.scoring import loglikelihood_rolling


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Negative log-likelihood in nats over a text of n_bytes UTF-8 bytes -> bits per byte."""
    if n_bytes <= 0:
        raise GptlabError("bits per byte needs a non-empty text")
    return total_nats / (math.log(2) * n_bytes)


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval's default word count for word_perplexity


@dataclass
class PerplexityResult:
    files: list[str]
    nats: float  # total negative log-likelihood
    tokens: int
    bytes: int
    words: int
    block_size: int
    stride: int
    per_file: list[dict] = field(default_factory=list)

    @property
    def loss(self) -> float:  # nats per token
        return self.nats / self.tokens

    def to_dict(self) -> dict:
        return {
            "files": self.files, "tokens": self.tokens, "bytes": self.bytes, "words": self.words,
            "block_size": self.block_size, "stride": self.stride, "nll_nats": self.nats,
            "loss": self.loss, "perplexity": math.exp(self.loss),
            "bits_per_byte": bits_per_byte(self.nats, self.bytes),
            "byte_perplexity": math.exp(self.nats / self.bytes), "word_perplexity": math.exp(self.nats / self.words),
            "per_file": self.per_file,
        }


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptlabError(f"perplexity: file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"perplexity: cannot read {p} as UTF-8 text: {e}") from None
    if not text:
        raise GptlabError(f"perplexity: {p} is empty")
    return text


def text_perplexity(model, tokenizer, texts: Sequence[str], names: Sequence[str] | None = None,
                    stride: int | None = None, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of `texts`, each one document. stride defaults to half the context window."""
    T = model.cfg.block_size
    stride = stride or max(1, T // 2)
    names = list(names) if names is not None else [f"text{i}" for i in range(len(texts))]
    total = PerplexityResult(names, 0.0, 0, 0, 0, T, stride)
    for name, text in zip(names, texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise GptlabError(f"perplexity: {name} encodes to no tokens")
        s = loglikelihood_rolling(model, ids, tokenizer.eot_id, stride, batch_size, tokenizer.vocab_size, progress)
        n_bytes, n_words = len(text.encode("utf-8")), count_words(text)
        total.nats -= s.logprob
        total.tokens += s.n_tokens
        total.bytes += n_bytes
        total.words += n_words
        total.per_file.append({"file": name, "tokens": s.n_tokens, "bytes": n_bytes, "loss": -s.logprob / s.n_tokens,
                               "bits_per_byte": bits_per_byte(-s.logprob, n_bytes)})
    return total


def file_perplexity(model, tokenizer, paths: Sequence[str | Path], stride: int | None = None, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> PerplexityResult:
    texts = [read_text(p) for p in paths]
    return text_perplexity(model, tokenizer, texts, [str(p) for p in paths], stride, batch_size, progress)
