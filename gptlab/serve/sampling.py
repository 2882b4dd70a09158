"""Per-row logits processing for a batch whose rows belong to different requests.

The generator's processors (gptlab.generate.logits) take one SamplingParams for the whole batch; here
each row brings its own. Rows with the same filter settings are filtered together, and every row draws
from its own torch.Generator, so a row's tokens do not depend on which other requests share the batch
(exactly so for greedy rows; sampled rows up to float rounding of the batched forward pass).
"""

from __future__ import annotations

import codecs
from collections import defaultdict
from dataclasses import dataclass

import torch

from gptlab.generate.constrain import Constraint, apply_masks
from gptlab.generate.logits import filter_logits, hold_stops, repetition_penalty
from gptlab.generate.params import SamplingParams
from gptlab.generate.spans import SpanGrammar


@dataclass
class RowSampler:
    """Sampling state of one row: its params, RNG, and the counts its penalties need."""
    params: SamplingParams
    gen: torch.Generator
    prompt: list[int]
    vocab: int
    logit_bias: dict[int, float]
    presence: float = 0.0
    frequency: float = 0.0
    logprobs: int | None = None
    spans: SpanGrammar | None = None  # an omni model: media spans well-formed, only the modalities asked for
    stop_ids: frozenset = frozenset()  # held back until params.min_tokens tokens are out
    constraint: Constraint | None = None  # structured output: a grammar masks the vocabulary

    def __post_init__(self) -> None:
        dev = self.gen.device
        self.seen = None  # CTRL repetition penalty: prompt + generated tokens
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
            self.seen[torch.tensor(self.prompt, device=dev)] = True
        self.counts = None  # OpenAI presence/frequency penalties: generated tokens only
        if self.presence or self.frequency:
            self.counts = torch.zeros(self.vocab, device=dev)
        self.generated = 0
        self.residual = None  # speculative decoding: after a rejected draft, the next token's distribution
        self.bias = None
        idx = [t for t in self.logit_bias if 0 <= t < self.vocab]  # ids past the vocabulary are ignored
        if idx:  # (an empty torch.tensor([]) is float, which index_add rejects)
            self.bias = (torch.tensor(idx, dtype=torch.long, device=dev),
                         torch.tensor([self.logit_bias[t] for t in idx], device=dev))

    @property
    def adjusts(self) -> bool:
        return (self.seen is not None or self.counts is not None or self.bias is not None or self.spans is not None
                or self.generated < self.params.min_tokens)

    @property
    def can_draft(self) -> bool:
        """Speculative decoding needs the distribution of token j+1 without having sampled token j:
        rows whose processing depends on their own output so far, or that report logprobs, take no drafts."""
        return not self.adjusts and self.constraint is None and self.logprobs is None

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) -> (V,) with bias and penalties applied."""
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1])
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.counts is not None:
            logits = logits - self.counts * self.frequency - (self.counts > 0).float() * self.presence
        if self.spans is not None:
            logits = self.spans.mask(logits[None])[0]
        return hold_stops(logits, self.stop_ids, self.generated, self.params)

    def observe(self, token: int) -> None:
        self.generated += 1
        if self.constraint is not None:
            self.constraint.push(token)
        if self.spans is not None:
            self.spans.push([token])
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def _filter_key(p: SamplingParams) -> tuple:
    return p.temperature, p.top_k, p.top_p, p.min_p


def sample_rows(logits: torch.Tensor, rows: list[RowSampler | None]) -> tuple[list[int], list]:
    """logits (B, V) fp32 raw model output; rows[i] None for rows no longer running.
    Returns (token per row, logprob info per row: None or (chosen logprob, [(token, logprob)] top-k))."""
    live = [i for i, r in enumerate(rows) if r is not None]
    proc = logits
    adj = [i for i in live if rows[i].adjusts]
    if adj:
        proc = logits.clone()
        for i in adj:
            proc[i] = rows[i].adjust(proc[i])
    constrained = [i for i in live if rows[i].constraint is not None]
    if constrained:  # last, so that no penalty or bias can bring a disallowed token back
        proc = proc if adj else logits.clone()
        apply_masks(proc, constrained, [rows[i].constraint for i in constrained])
    tokens = proc.argmax(dim=-1)  # greedy rows keep these
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in live:
        if rows[i].params.temperature > 0:
            groups[_filter_key(rows[i].params)].append(i)
    for idx in groups.values():
        probs = torch.softmax(filter_logits(proc[idx], rows[idx[0]].params), dim=-1)
        # extreme settings (temperature 1e-300, repetition_penalty 1e-300) overflow to inf/nan, and
        # multinomial would raise for the whole batch: such a row keeps its top token (the limit it tends to)
        ok = torch.isfinite(probs).all(dim=-1).tolist()
        for j, i in enumerate(idx):
            if ok[j]:
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].gen)[0]
    for i in live:
        if rows[i].residual is not None:  # a draft was rejected: draw from norm(max(0, p - q))
            tokens[i] = torch.multinomial(rows[i].residual, 1, generator=rows[i].gen)[0]
            rows[i].residual = None
    toks = tokens.tolist()
    info: list = [None] * len(rows)
    want = [i for i in live if rows[i].logprobs is not None]
    if want:  # logprobs of the model's own distribution (before penalties, temperature and filters)
        lp = torch.log_softmax(logits[want], dim=-1)
        k = max(rows[i].logprobs for i in want)
        top_v, top_i = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for j, i in enumerate(want):
            kk = rows[i].logprobs
            info[i] = (lp[j, toks[i]].item(), list(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist())))
    for i in live:
        rows[i].observe(toks[i])
    return toks, info


def prompt_logprobs(h: torch.Tensor, prompt: list[int], k: int, tok, logits_fn, chunk: int = 256) -> list:
    """h (L, C) hidden states of a prompt -> per token (id, logprob, [(id, logprob)] top-k, text offset);
    the first token has no logprob (None), as in OpenAI's and vLLM's echo. logits_fn: (N, 1, C) -> (N, V)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, text = [], 0
    for t in prompt:
        offsets.append(text)
        text += len(decoder.decode(tok.decode_bytes([t])))
    out = [(prompt[0], None, None, 0)]
    ids = torch.tensor(prompt[1:], device=h.device)
    for a in range(0, len(prompt) - 1, chunk):  # (chunk, V) at a time: a long prompt x a large vocabulary
        lp = torch.log_softmax(logits_fn(h[a:a + chunk, None]), dim=-1)
        got = lp.gather(1, ids[a:a + chunk, None])[:, 0].tolist()
        top_v, top_i = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for j, v in enumerate(got):
            out.append((prompt[a + j + 1], v, list(zip(top_i[j].tolist(), top_v[j].tolist())), offsets[a + j + 1]))
    return out
