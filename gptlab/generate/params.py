"""Decoding controls, validated once so the hot loop does not re-check them."""

from __future__ import annotations

from dataclasses import dataclass

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus; 1 = off
    min_p: float = 0.0  # drop tokens below min_p × the top probability; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already in the sequence
    no_repeat_ngram_size: int = 0  # ban any n-gram from occurring twice; 0 = off
    stop: tuple = ()  # stop strings (not included in the output unless include_stop_str)
    stop_token_ids: tuple = ()  # extra stop tokens; the end-of-text token always stops
    seed: int | None = None  # same seed, same prompt, same params => same text
    num_beams: int = 1  # > 1: beam search (deterministic)
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty (GPT-3: 0.6 with 4 beams)
    strict: bool = False  # an over-long prompt is an error instead of keeping its most recent tokens
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks)
    min_tokens: int = 0  # the stop tokens (end of text, stop_token_ids) cannot be drawn before this many
    include_stop_str: bool = False  # keep the stop string that ended the text (vLLM's include_stop_str_in_output)
    modalities: tuple = ()  # an omni model's reply: the media it may produce ("image", "audio"); () = any it has

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1"),
            (self.temperature >= 0, "temperature must be ≥ 0"),
            (self.top_k >= 0, "top_k must be ≥ 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be ≥ 0"),
            (self.num_beams >= 1, "num_beams must be ≥ 1"),
            (0 <= self.min_tokens <= self.max_new_tokens, "min_tokens must be in [0, max_new_tokens]"),
            (set(self.modalities) <= {"text", "image", "audio"}, "modalities are text, image and audio"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GptlabError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.num_beams > 1
