"""Logits processing and sampling, batched over rows: (B, V) in, (B,) token ids out."""

from __future__ import annotations

import torch

from gptlab.generate.params import SamplingParams


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, r: float) -> torch.Tensor:
    """CTRL's repetition penalty: positive logits of seen tokens divided by r, negative ones multiplied."""
    return torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)


def apply_penalties(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
                    banned: list[list[int]] | None) -> torch.Tensor:
    """Repetition penalty and n-gram bans."""
    if seen is not None and p.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, p.repetition_penalty)
    if banned and any(banned):  # one indexed write for all rows (one host->device copy on GPUs)
        rows = [r for r, toks in enumerate(banned) for _ in toks]
        cols = [t for toks in banned for t in toks]
        idx = torch.tensor([rows, cols], device=logits.device)
        logits = logits.index_put((idx[0], idx[1]), torch.tensor(float("-inf"), device=logits.device))
    return logits


def hold_stops(logits: torch.Tensor, stop_ids, generated: int, p: SamplingParams) -> torch.Tensor:
    """Before `p.min_tokens` tokens, the stop tokens get -inf (vLLM's min_tokens); (..., V) in and out."""
    if generated >= p.min_tokens:
        return logits
    ids = sorted(t for t in stop_ids if 0 <= t < logits.size(-1))
    if not ids:
        return logits
    logits = logits.clone()
    logits[..., ids] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered tokens get -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, p: SamplingParams, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row; row i draws from generators[i] (its own seed), or the global RNG if None."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, p), dim=-1)
    if all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(generators)])


class NgramBlocker:
    """No-repeat-n-gram: remembers, per row, which tokens followed each (n-1)-gram so far."""

    def __init__(self, n: int, rows: list[list[int]]):
        self.n = n
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in rows]
        self.tails = [list(r[-(n - 1):]) if n > 1 else [] for r in rows]
        for i, r in enumerate(rows):
            for j in range(len(r) - n + 1):
                self.seen[i].setdefault(tuple(r[j:j + n - 1]), set()).add(r[j + n - 1])

    def banned(self) -> list[list[int]]:
        return [sorted(self.seen[i].get(tuple(t), ())) if len(t) == self.n - 1 else [] for i, t in enumerate(self.tails)]

    def push(self, tokens: list[int]) -> None:
        for i, tok in enumerate(tokens):
            t = self.tails[i]
            if len(t) == self.n - 1:
                self.seen[i].setdefault(tuple(t), set()).add(tok)
            t.append(tok)
            if len(t) > self.n - 1:
                t.pop(0)

    def reorder(self, index: list[int]) -> None:
        self.seen = [dict((k, set(v)) for k, v in self.seen[i].items()) for i in index]
        self.tails = [list(self.tails[i]) for i in index]
